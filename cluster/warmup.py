"""Build DeepSpeed's CPU shared-memory collective once, at set-up time.

DeepSpeed JIT-compiles ``deepspeed_shm_comm`` on first use (tens of seconds to
minutes on 2 cores) and caches it in ~/.cache/torch_extensions; doing it here
keeps that cost out of the first training run and out of test timeouts.
"""

from __future__ import annotations

import sys


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("warmup: no shared-memory collective for this accelerator; nothing to build")
        return 0
    builder.load()
    print(f"warmup: {builder.absolute_name()} is built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
