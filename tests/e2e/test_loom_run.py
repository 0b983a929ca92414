"""`loom run` on the tiny recipe, as a user runs it, queried with the official openai client."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.browser import render
from tests.conftest import REPO_ROOT, TINY, free_port
from tests.e2e.conftest import CHAIN, RUN_NAME

pytestmark = pytest.mark.e2e
READY = "[loom] serving at "


def test_loom_run_whole_chain_then_query_the_endpoint(e2e_storage, tmp_path):
    import openai

    port = free_port()
    log_path = tmp_path / "loom-run.log"
    command = [
        sys.executable, "-m", "cluster", "run", str(TINY),
        f"storage={e2e_storage}", f"run_name={RUN_NAME}", f"serve.port={port}", *CHAIN, "--keep-serving",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 2400  # a ceiling for a loaded machine: the loop ends when it serves
        url = None
        while time.monotonic() < deadline and process.poll() is None:
            # Anywhere in a line: Ray's progress bars can leave cursor codes in front of it.
            found = re.search(re.escape(READY) + r"(\S+)", log_path.read_text(errors="replace"))
            url = found.group(1) if found else None
            if url:
                break
            time.sleep(2)
        output = log_path.read_text(errors="replace")
        assert url, f"loom run never served (exit {process.poll()}):\n{output[-5000:]}"
        assert url == f"http://127.0.0.1:{port}/v1"

        # The demo printed real completions and the run directory with its manifest.
        assert "[completion] 'def fibonacci(n):'" in output and "[chat]" in output
        run_dir = e2e_storage / RUN_NAME
        assert f"[loom] run directory: {run_dir}" in output
        # Loom's lines on the terminal; Ray's, vLLM's and DeepSpeed's logs in the run directory.
        assert "[loom] held-out perplexity: " in output and "before training -> " in output
        # The eval table's headline: each task's lead metric for the trained model (compress is off here).
        assert "[loom] eval (lm-evaluation-harness, held-out tasks): base" in output
        assert "[loom]   loom_choice acc (higher is better, n=" in output
        assert output.count("\n") < 200, f"{output.count(chr(10))} lines on the terminal"
        assert "INFO" not in output and "Started Serve" not in output, output[-3000:]
        assert (run_dir / "logs" / "loom.log").stat().st_size > 0
        assert (run_dir / "logs" / "ray").is_dir() and any((run_dir / "logs" / "ray").glob("worker-*.out"))
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert set(manifest["stages"]) == {"data", "train", "tune", "eval", "serve"}
        for stage in ("data", "train", "tune"):
            assert (run_dir / stage / "_COMPLETE").is_file()
        assert manifest["stages"]["serve"]["inputs"]["model:loom-tiny"]
        # The sweep ran first and decided the training run's learning rate.
        best = json.loads((run_dir / "tune" / "best.json").read_text())["best"]
        assert manifest["stages"]["train"]["metrics"]["tuned"]["params"] == best["params"]
        assert manifest["stages"]["train"]["upstream"].keys() == {"data", "tune"}
        assert output.index("[loom] tune: running") < output.index("[loom] train: running")
        # The run's report page, in a real browser: every figure the stages plotted loads.
        assert f"[loom] report: {run_dir / 'report' / 'index.html'}" in output
        page = render(run_dir / "report" / "index.html", tmp_path / "report.png")
        assert page.body_attribute("broken-images") == "0" and int(page.body_attribute("images")) >= 3

        client = openai.OpenAI(base_url=url, api_key="unused")
        # A tiny random-ish model may emit EOS at any point: ignore_eos (a vLLM extension) makes the
        # token counts below a property of the server, not of what the model happened to learn.
        full = {"ignore_eos": True}
        completion = client.completions.create(
            model="loom-tiny", prompt="class Foo:", max_tokens=8, temperature=0, extra_body=full
        )
        assert isinstance(completion.choices[0].text, str) and completion.usage.completion_tokens == 8
        chat = client.chat.completions.create(
            model="loom-tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert chat.choices[0].message.content is not None
        stream = client.completions.create(
            model="loom-tiny", prompt="import", max_tokens=6, stream=True, extra_body=full
        )
        assert len([chunk for chunk in stream if chunk.choices]) >= 2  # streamed, not one final answer
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
    assert process.returncode == 0, log_path.read_text(errors="replace")[-5000:]
