"""Optional ``torch.compile`` of the training model, with a fallback to eager execution."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types that TorchDynamo and TorchInductor raise when compilation fails."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


class CompiledWithFallback(nn.Module):
    """Run a module through ``torch.compile`` and fall back to eager execution when compiling fails.

    ``torch.compile`` only traces and compiles at the first call, so a missing C compiler, an
    unsupported platform or a TorchDynamo bug surfaces there. Any exception of the first compiled
    call, and any compiler exception of a later call (a recompilation), logs a warning and switches
    this wrapper to the eager module for good. The failed call is then repeated eagerly, so an
    error of the model itself is raised by the eager run.

    The eager module is registered as ``module``, so ``unwrap_model`` and ``parameters()`` reach it
    as through DDP. The compiled callable shares its parameters and is not registered.

    NOTE: TorchInductor compiles the backward graph at the first backward pass, after ``forward``
    has returned; a failure there is raised, not caught.
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.module = module
        self.fallback_reason: Optional[str] = None
        self._succeeded_once = False
        self._compiled: Optional[Any] = None
        try:
            import torch._dynamo

            if not torch._dynamo.is_dynamo_supported():
                raise RuntimeError("TorchDynamo does not support this platform or Python version")
            compiled = torch.compile(module, **compile_kwargs)
        except Exception as error:  # noqa: BLE001 - any failure to set up compilation means eager execution
            self._fall_back(error)
        else:
            # Stored outside nn.Module's registry so that state_dict() and parameters() list each tensor once.
            object.__setattr__(self, "_compiled", compiled)

    @property
    def compiled(self) -> bool:
        """True while calls go through the compiled module."""
        return self._compiled is not None

    def _fall_back(self, error: BaseException) -> None:
        self.fallback_reason = f"{type(error).__name__}: {error}"
        object.__setattr__(self, "_compiled", None)
        logger.warning("torch.compile failed, running the model eagerly instead (%s)",
                       self.fallback_reason.splitlines()[0][:500])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None:
            catch = Exception if not self._succeeded_once else _compiler_errors()
            try:
                out = self._compiled(*args, **kwargs)
            except catch as error:  # noqa: BLE001 - the first call also covers C compiler and platform errors
                self._fall_back(error)
            else:
                self._succeeded_once = True
                return out
        return self.module(*args, **kwargs)
