"""SGLang plugin entry point (group `sglang.srt.plugins`): adds `--load-balance-method kvmul`.

SGLang runs `register()` in every process it starts. It must work under the `spawn` start method,
where replacing `run_data_parallel_controller_process` has no effect (the child unpickles the
original by name before plugins load); so the controller *class* is replaced instead, and only in
the process that already imported the controller module (the DP controller itself).
"""

from __future__ import annotations

import os
import sys
import typing

from sglang_kvmul import METHOD_NAME

_DPC_MODULE = "sglang.srt.managers.data_parallel_controller"
_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def _add_cli_choice() -> None:
    """Make `kvmul` an accepted value of SGLang's `--load-balance-method`.

    The choices live in the field's `Arg` annotation, on the `Parallel` group (a PEP 563 string,
    re-evaluated on every `get_type_hints`) and on `ServerArgs` (evaluated once when the class is
    built), so extend the evaluated one and store it on both.
    """
    from sglang.srt.arg_groups.arg_utils import Arg
    from sglang.srt.arg_groups.fields.parallel import Parallel
    from sglang.srt.server_args import ServerArgs

    field = "load_balance_method"
    for cls in (ServerArgs, Parallel):
        hint = typing.get_type_hints(cls, include_extras=True)[field]
        for meta in getattr(hint, "__metadata__", ()):
            if isinstance(meta, Arg) and meta.choices is not None and METHOD_NAME not in meta.choices:
                meta.choices.append(METHOD_NAME)
        cls.__annotations__[field] = hint


def _mark_load_aware() -> None:
    """kvmul reads load snapshots, like SGLang's total_requests/total_tokens methods."""
    from sglang.srt.managers import load_snapshot

    load_snapshot._LOAD_AWARE_METHODS = load_snapshot._LOAD_AWARE_METHODS | {METHOD_NAME}


def _from_str_around(original, cls, method: str):
    """The stock controller parses the method into an enum; kvmul starts from its round-robin base."""
    if method.lower() == METHOD_NAME:
        return cls.ROUND_ROBIN
    return original(cls, method)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _add_cli_choice()
    _mark_load_aware()
    from sglang_kvmul.serving import event_privacy, event_registration, fresh_outputs

    event_privacy.install_from_env()  # in every process; only schedulers create publishers
    event_registration.install()
    if _SCHEDULER_MODULE in sys.modules:  # a scheduler's process (spawned: it imported the module first)
        fresh_outputs.install()
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":  # CPU only (set by cpu_compat.cpu_env)
        from sglang_kvmul.cpu_compat import attention

        attention.install()
    if _DPC_MODULE in sys.modules:
        from sglang_kvmul.serving.controller import KvmulDataParallelController

        HookRegistry.register(f"{_DPC_MODULE}.DataParallelController", KvmulDataParallelController, HookType.REPLACE)
        HookRegistry.register(f"{_DPC_MODULE}.LoadBalanceMethod.from_str", _from_str_around, HookType.AROUND)
