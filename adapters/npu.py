"""The Ascend NPU backend. torch_npu is imported here only, lazily, never at package import.

torch_npu needs CANN (driver, toolkit, ops) at import time; without it the import fails with
``ImportError: libhccl.so: cannot open shared object file`` (torch_npu installation FAQ).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from dimoo_npu.adapters.base import Availability, Backend
from dimoo_npu.utils import envs

INSTALL_FIX = "pip install -e '.[npu]' (torch-npu==2.13.0 beside the CPU build of torch==2.13.0)"
CANN_FIX = "install CANN 9.x and run: source /usr/local/Ascend/ascend-toolkit/set_env.sh"
DEVICE_FIX = "check `npu-smi info`, the /dev/davinci* device mounts and ASCEND_RT_VISIBLE_DEVICES"


def import_torch_npu():
    """Import torch_npu (which also makes ``torch.npu`` exist) and return the module.

    Once imported it comes from sys.modules: the npu ops call this in the forward, and graph mode traces a
    sys.modules lookup but breaks the graph at importlib (a model resolving npu ops has imported it already).
    """
    return sys.modules.get("torch_npu") or importlib.import_module("torch_npu")


def import_torchair():
    """torchair, the graph-mode backend shipped inside torch_npu; torch_npu must be imported before it."""
    import_torch_npu()
    return importlib.import_module("torchair")


class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    default_dtype = torch.bfloat16

    def availability(self) -> Availability:
        if importlib.util.find_spec("torch_npu") is None:
            return Availability(False, "torch_npu is not installed", INSTALL_FIX)
        try:
            import_torch_npu()
        except ImportError as err:  # the CANN shared libraries are missing or not on the library path
            return Availability(False, f"torch_npu cannot load CANN ({err})", CANN_FIX)
        except RuntimeError as err:  # e.g. a CUDA build of torch next to torch_npu
            return Availability(False, f"torch_npu refused to load ({err})", INSTALL_FIX)
        if envs.ascend_visible_devices() == "":
            return Availability(False, "ASCEND_RT_VISIBLE_DEVICES is empty, so no NPU is visible", DEVICE_FIX)
        if not self.runtime().is_available() or self.device_count() == 0:
            return Availability(False, "no NPU device is visible", DEVICE_FIX)
        return Availability(True)

    def runtime(self):
        """torch_npu's own ``npu`` module, not `torch.get_device_module`: that caches its answer per process, and
        a torch_npu that cannot rename the privateuse1 device (the tests' fake) never registers "npu" there."""
        return import_torch_npu().npu

    def compile_backend(self):
        """torchair's GE graph backend with its default config (torchair docs: ``get_npu_backend``)."""
        torchair = import_torchair()
        return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())

    def versions(self) -> dict[str, str]:
        torch_npu = import_torch_npu()
        cann = next(iter(envs.cann_homes()), "")
        return {"torch": torch.__version__, "torch_npu": getattr(torch_npu, "__version__", "?"), "cann_home": cann}
