"""`python -m sglang_kvmul.check`: the post-deployment self-check (see `launch.check`)."""

import sys

from sglang_kvmul.launch.check import main

if __name__ == "__main__":
    sys.exit(main())
