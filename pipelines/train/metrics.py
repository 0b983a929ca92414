"""Training metrics beyond the loss: model FLOPs utilisation, and export to Prometheus.

Reports go to Ray Train (``ray.train.report``) and the run's metrics log; the same numbers are
also set on Ray metrics gauges, which Ray's metrics agent serves in Prometheus format next to
Serve's and vLLM's (``ray_loom_train_*``).
"""

from __future__ import annotations

#: Dense bf16/fp16 tensor-core peak per GPU, TFLOP/s (vendor datasheets; SXM parts, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def flops_per_token(parameters: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus the attention
    scores, 12 * layers * hidden * seq_len (PaLM's appendix B estimate)."""
    return 6.0 * parameters + 12.0 * num_layers * hidden_size * seq_len


def peak_flops(device) -> float | None:
    """Peak FLOP/s of a CUDA device, by name; None on CPU or for an unknown GPU."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for model, tflops in PEAK_TFLOPS.items():
        if model in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token_value: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the device's peak."""
    return None if peak is None else tokens_per_s_per_device * flops_per_token_value / peak


class PrometheusGauges:
    """Ray metrics gauges for rank 0's reports, labelled by run name."""

    EXPORTED = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_mib", "mfu", "val_loss", "step")

    def __init__(self, run_name: str, resumed: bool):
        from ray.util.metrics import Counter, Gauge

        self._tags = {"run": run_name}
        self._gauges = {
            name: Gauge(f"loom_train_{name}", f"Training {name.replace('_', ' ')} (rank 0's last report).", ("run",))
            for name in self.EXPORTED
        }
        # One per worker-group start: resumed="true" is a restart from the last checkpoint after a failure.
        starts = Counter("loom_train_starts", "Worker-group starts of a training run.", ("run", "resumed"))
        starts.inc(tags={**self._tags, "resumed": str(resumed).lower()})

    def set(self, metrics: dict[str, float]) -> None:
        for name, gauge in self._gauges.items():
            if metrics.get(name) is not None:
                gauge.set(float(metrics[name]), tags=self._tags)
