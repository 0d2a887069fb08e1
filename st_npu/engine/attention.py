"""Boolean attention masks for SDPA on the NPU, so torch_npu can use its fused attention kernel.

torch_npu sends ``scaled_dot_product_attention`` to ``npu_fusion_attention`` (910B and newer) only with no mask or
a bool mask on 4-D inputs; a float additive mask falls back to many small operators. Transformers also checks
the mask's contents on the host (``mask.all()``) to decide whether to skip it, which is a host<->device sync that
NPU graph capture refuses.

``enable(model, family)`` adds hooks around the first module (the transformer sees the new mask; pooling and
``encode`` still get the 2-D one) that hand the transformer a mask it passes through unchanged, without inspecting
it. The mask keeps the model's own attention (:mod:`.family`): padding only for an encoder, causal and padding for
a decoder (a decoder takes a 4-D mask as given, so a padding-only one would silently make it bidirectional).
- transformers 5.x (``masking_utils.create_bidirectional_mask`` exists): the 2-D padding mask becomes the 4-D bool
  mask (rows, 1, tokens, tokens) that 5.x would have built itself; a 4-D mask is used as given. For a decoder it is
  what 5.x's ``sdpa_mask`` builds: key <= query and key not padding, from an ``arange`` on the mask's device. Under
  left padding the padded query rows attend to nothing; 5.x leaves them so too (torch >= 2.5 SDPA gives such rows
  zeros, not NaN), so those rows, which no real token attends to, are what stock computes.
- transformers 4.x: the 2-D mask becomes 3-D, which 4.x turns into its float extended mask without the host check,
  and a second hook on the encoder turns that float mask (0 attend, dtype-min masked) into the equivalent bool one.
  Decoders (no ``encoder`` module) step aside and keep 4.x's own masks, as do sliding-window models on either.
Only for models whose attention implementation is ``sdpa``: eager attention adds the mask to the scores and needs
it as a float. Softmax gives masked keys weight 0 in both forms, so embeddings do not change.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from st_npu.engine.family import Family


def enable(model: Any, family: Family) -> list[Any]:
    """Install the hooks when the first module is an SDPA transformer; returns their handles."""
    first = model[0]
    auto_model = getattr(first, "auto_model", None)
    config = getattr(auto_model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or family.windowed:
        return []
    if _transformers_builds_bool_masks():
        swap = _MaskSwap(_four_d_causal if family.causal else _four_d_bool)
        return [first.register_forward_pre_hook(swap.before), first.register_forward_hook(swap.after)]
    encoder = getattr(auto_model, "encoder", None)
    if encoder is None or family.causal:
        return []
    swap = _MaskSwap(_three_d)
    return [first.register_forward_pre_hook(swap.before), first.register_forward_hook(swap.after),
            encoder.register_forward_pre_hook(_float_mask_to_bool, with_kwargs=True)]


def _transformers_builds_bool_masks() -> bool:
    try:
        from transformers import masking_utils
    except ImportError:  # transformers 4.x before masking_utils
        return False
    return hasattr(masking_utils, "create_bidirectional_mask")


class _MaskSwap:
    """Around the first module: the transformer sees the reshaped mask, the modules after it the 2-D one."""

    def __init__(self, reshape: Any) -> None:
        self.reshape = reshape
        self.stash = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # threading.local does not pickle (multi-process pools)
        return {"reshape": self.reshape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["reshape"])

    def before(self, module: Any, args: tuple) -> tuple | None:
        features = args[0] if args and isinstance(args[0], dict) else None
        mask = features.get("attention_mask") if features is not None else None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        self.stash.mask = mask
        return ({**features, "attention_mask": self.reshape(mask)}, *args[1:])

    def after(self, module: Any, args: tuple, output: Any) -> Any:
        mask = getattr(self.stash, "mask", None)
        self.stash.mask = None
        if mask is not None and isinstance(output, dict) and "attention_mask" in output:
            output["attention_mask"] = mask
        return output


def _four_d_bool(mask: torch.Tensor) -> torch.Tensor:
    rows, tokens = mask.shape
    return mask.bool()[:, None, None, :].expand(rows, 1, tokens, tokens)


def _four_d_causal(mask: torch.Tensor) -> torch.Tensor:
    tokens = mask.shape[1]
    position = torch.arange(tokens, device=mask.device)
    causal = position[None, :] <= position[:, None]  # (query, key): a key at or before its query
    return mask.bool()[:, None, None, :] & causal[None, None]


def _three_d(mask: torch.Tensor) -> torch.Tensor:
    rows, tokens = mask.shape
    return mask[:, None, :].expand(rows, tokens, tokens)


def _float_mask_to_bool(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return None
    kwargs["attention_mask"] = mask == 0
    return args, kwargs
