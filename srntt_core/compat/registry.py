"""Registration of the compat modules in BasicSR-style and mmagic/mmedit-style registries.

Neither framework is imported when this module is imported; each ``register_*`` function imports
its framework's registry only when called without one (or takes any object with the same method).
"""

from __future__ import annotations

from torch import nn

from .c2matching import CorrespondenceMatcher
from .masa import MASAWarp
from .ttsr import SearchTransfer, SearchTransformer

__all__ = ["MODULES", "register_basicsr", "register_mmagic"]

# name in the registry -> class; names carry a prefix so they never collide with the codebase's own.
MODULES: dict[str, type[nn.Module]] = {
    "SRNTTCoreSearchTransfer": SearchTransfer,
    "SRNTTCoreSearchTransformer": SearchTransformer,
    "SRNTTCoreCorrespondenceMatcher": CorrespondenceMatcher,
    "SRNTTCoreMASAWarp": MASAWarp,
}


def register_basicsr(registry=None, *, names: dict[str, type[nn.Module]] | None = None):
    """Register the modules in a BasicSR ``Registry`` (default ``basicsr.utils.registry.ARCH_REGISTRY``).

    BasicSR registers by class name, so each class is registered through a subclass carrying the
    registry name. Names already present are left alone. Returns the registry.
    """
    if registry is None:
        from basicsr.utils.registry import ARCH_REGISTRY as registry
    for name, cls in (names or MODULES).items():
        if name in registry:
            continue
        registry.register(type(name, (cls,), {"__doc__": cls.__doc__, "__module__": cls.__module__}))
    return registry


def _default_mm_registry():
    try:
        from mmagic.registry import MODELS
    except ImportError:
        try:
            from mmedit.registry import MODELS  # mmedit 1.x
        except ImportError:
            from mmedit.models.registry import COMPONENTS as MODELS  # mmedit 0.x
    return MODELS


def register_mmagic(registry=None, *, names: dict[str, type[nn.Module]] | None = None, force: bool = False):
    """Register the modules in an mmengine/mmcv ``Registry`` (default: mmagic's ``MODELS``, else
    mmedit's). ``force`` replaces modules already registered under the same names. Returns the registry.
    """
    if registry is None:
        registry = _default_mm_registry()
    for name, cls in (names or MODULES).items():
        registry.register_module(name=name, module=cls, force=force)
    return registry
