"""`python -m sglang_kvmul.demo`: the main job's entry point (see `harness.demo`)."""

from sglang_kvmul.harness.demo import main

if __name__ == "__main__":
    main()
