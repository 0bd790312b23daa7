"""The contract tests' one reference mechanism: while a chosen module runs, the attention call its processor
makes (``F.scaled_dot_product_attention`` or diffusers' ``dispatch_attention_fn``, looked up in the given
modules) is replaced by an explicit computation written in the test. QK-norm and RoPE stay the model's own."""
import torch

SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def patch_attention(monkeypatch, model, names, attention, functional_modules, dispatch_modules):
    """``attention(name, q, k, v, **sdpa_kwargs)`` on (B, heads, S, d) tensors replaces the attention call of
    each module in ``names`` while it runs; every other call is untouched."""
    active = [None]
    modules = dict(model.named_modules())
    for name in names:
        original = modules[name].forward

        def forward(*args, __name=name, __original=original, **kwargs):
            active[0] = __name
            try:
                return __original(*args, **kwargs)
            finally:
                active[0] = None
        monkeypatch.setattr(modules[name], "forward", forward)

    def sdpa_kwargs(args, kwargs):
        return {**dict(zip(SDPA_ARGS, args)), **{n: kwargs[n] for n in SDPA_ARGS if n in kwargs}}

    class FunctionalWithReference:  # torch.nn.functional, but SDPA of an active module is the reference
        def __getattr__(self, item):
            return getattr(torch.nn.functional, item)

        def scaled_dot_product_attention(self, q, k, v, *args, **kwargs):
            if active[0] is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)
            return attention(active[0], q, k, v, **sdpa_kwargs(args, kwargs))

    def dispatch_of(original_dispatch):
        def dispatch(q, k, v, *args, **kwargs):  # diffusers' dispatch_attention_fn takes (B, S, H, d)
            if active[0] is None:
                return original_dispatch(q, k, v, *args, **kwargs)
            out = attention(active[0], *(t.transpose(1, 2) for t in (q, k, v)), **sdpa_kwargs(args, kwargs))
            return out.transpose(1, 2)
        return dispatch

    for module in functional_modules:
        monkeypatch.setattr(module, "F", FunctionalWithReference())
    for module in dispatch_modules:
        monkeypatch.setattr(module, "dispatch_attention_fn", dispatch_of(module.dispatch_attention_fn))
