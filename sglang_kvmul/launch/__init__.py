"""Starting a server: argv defaults, own flags, free ports (`python -m sglang_kvmul.launch_server`)."""
