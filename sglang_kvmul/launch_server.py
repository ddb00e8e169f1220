"""`python -m sglang_kvmul.launch_server`: the user-facing entry point (see `launch.server`)."""

from sglang_kvmul.launch.server import main

if __name__ == "__main__":
    main()
