"""torch.compile (issue 19, item 4): a tiny UNet compiled in place (``model.compile``, as ``unet.compile()``) under
``pagkit.sample`` with CFG + PAG: it matches eager, compiles one graph for a 10-step run and nothing new on a second
run (``torch._dynamo.config.error_on_recompile`` turns any recompilation into an error; ``counters`` count graphs
and graph breaks). Row routing (the TorchFunctionMode at the attention sites, routing.py) is traced into the graph:
no graph break.

Backend: ``aot_eager`` (dynamo's tracing and AOTAutograd, which is where graph breaks and recompiles arise) for the
fast tests; the same test runs ``inductor`` (C++ codegen on CPU) with ``PAGKIT_INDUCTOR=1``: measured here, one graph
for two 10-step runs, no graph break, max |compiled − eager| = 2.2e-5 (first compile 263 s on a busy 2-core CPU).
"""
import os
import shutil

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import models
import pagkit

LATENTS = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _run(model, guidance, steps=10):
    return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=steps, guidance=guidance,
                         class_labels=torch.tensor([1, 2]), null_class_label=10, latents=LATENTS, progress_bar=False)


@pytest.fixture
def fresh():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _graphs():
    return counters["stats"]["unique_graphs"]


INDUCTOR = pytest.mark.skipif(
    os.environ.get("PAGKIT_INDUCTOR") != "1" or shutil.which("g++") is None,
    reason="inductor's C++ build of this UNet takes ~4-5 min on CPU; set PAGKIT_INDUCTOR=1 (needs g++) to run it")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_unet_under_sample_with_pag_matches_eager_and_compiles_once(fresh, backend):
    model = models.unet2d(num_class_embeds=11)
    guidance = [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid")]
    eager = _run(model, guidance)
    model.compile(backend=backend)
    with dynamo.config.patch(error_on_recompile=True):  # a recompilation at any later step raises
        first = _run(model, guidance)
        assert _graphs() == 1
        second = _run(model, guidance)
    assert _graphs() == 1 and not counters["graph_break"]
    tolerance = 0 if backend == "aot_eager" else 1e-4  # inductor fuses and reorders float sums
    torch.testing.assert_close(first, eager, rtol=0, atol=tolerance)
    assert torch.equal(first, second)
    assert not torch.allclose(eager, _run(model, [pagkit.CFG(2.0)]), atol=1e-4)  # PAG acts in the compiled graph
    assert not any("forward" in vars(m) for m in model.modules())  # routing's patches gone after the run


def test_schedules_and_caching_add_no_recompile_per_step(fresh):
    """A schedule (PAG from step 3 on) and caching (cache=2: 6 rows and 4 rows, alternately) change the batch:
    dynamo compiles a second graph, with a dynamic batch, once, and no more over the run (10 steps), nor on a
    second run."""
    model = models.unet2d(num_class_embeds=11)
    model.compile(backend="aot_eager")
    cached = [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", cache=2)]
    _run(model, cached)
    assert _graphs() == 2 and not counters["graph_break"]
    with dynamo.config.patch(error_on_recompile=True):
        _run(model, cached)
        _run(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", start=0.3)])
    assert _graphs() == 2 and not counters["graph_break"]
    model_eager = models.unet2d(num_class_embeds=11)
    torch.testing.assert_close(_run(model, cached), _run(model_eager, cached), rtol=0, atol=0)
