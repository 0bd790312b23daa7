"""Long runs leak nothing (issue 20, item 4): 1,000 ``attach``/exit cycles and 10,000 guided steps across methods
leave the model's processors, forwards, hooks and module count exactly as before, and the process's RSS grows
by less than 50 MB after warm-up. Tiny models, batch 1, one step per call, so that it runs in CI."""
import torch
from diffusers import DDIMScheduler, DDPMPipeline

import models
import pagkit
from test_any_model import _dit


def _state(model) -> list:
    """Everything guidance might leave behind on a model, module by module."""
    out = []
    for name, m in model.named_modules():
        out.append((name, type(m).__name__, type(getattr(m, "processor", None)).__name__, "forward" in vars(m),
                    len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(getattr(m, "_backward_pre_hooks", {})), len(m._state_dict_hooks),
                    tuple(sorted(k for k in vars(m) if "pagkit" in k or k.startswith("_guid")))))
    out.append(("params", tuple(p.data_ptr() for p in model.parameters())))
    return out


def _globals() -> tuple:
    from torch.nn.modules import module
    return (len(module._global_forward_hooks), len(module._global_forward_pre_hooks),
            len(module._global_backward_hooks), torch._C._len_torch_function_stack())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


TERMS = [[pagkit.PAG(1.0, layers="mid")], [pagkit.SEG(1.0, layers="down.1")], [pagkit.SAG(0.5, layer="mid")],
         [pagkit.SLG(1.0, layers="mid")], [pagkit.TPG(1.0, layers="mid")],
         [pagkit.PAG(1.0, layers="mid", perturbation="noise"), pagkit.SEG(0.5, sigma=2.0, layers="up.1")]]


def test_a_thousand_attach_cycles_leave_the_pipeline_as_it_was():
    pipe = DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler())
    before, globals_before = _state(pipe.unet), _globals()
    rss = None
    for i in range(1000):
        with pagkit.attach(pipe, *TERMS[i % len(TERMS)]):
            if i % 250 == 0:  # now and then a real guided call inside
                pipe(batch_size=1, num_inference_steps=1, output_type="np")
        if i == 100:
            rss = _rss_mb()
    assert _state(pipe.unet) == before and _globals() == globals_before
    assert _rss_mb() - rss < 50


def test_ten_thousand_guided_steps_leave_the_model_as_it_was_and_do_not_grow():
    model = _dit()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    before, globals_before = _state(model), _globals()
    terms = [[pagkit.PAG(1.0, layers="blocks.0.attn")], [pagkit.SEG(1.0, layers="blocks.1.attn")],
             [pagkit.PAG(1.0, layers="blocks.*.attn", perturbation="noise")],
             [pagkit.PAG(0.5, layers="blocks.1.attn", start=0.2, stop=0.8, scale_end=2.0)]]
    denoisers = [pagkit.GuidedDenoiser(model, t, scheduler=scheduler) for t in terms]
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([1])
    rss = None
    with torch.no_grad():
        for i in range(10_000):
            t = scheduler.timesteps[i % 10]
            out = denoisers[i % len(denoisers)].predict(x, t, {"y": y}, None, progress=(i % 10) / 10)
            if i == 1000:
                rss = _rss_mb()
    assert torch.isfinite(out).all()
    assert _state(model) == before and _globals() == globals_before
    assert _rss_mb() - rss < 50
