"""The studio page (Gradio Blocks). Thin: every callback calls ``pagkit.studio.core`` and shows what it returns.

Four tabs share the model, sampler, steps, seed, seed count and the model's condition at the top (a class, or a
pipeline folder's prompt and negative prompt): Compare (up to six
configurations on the same seeds), Scale strip (one method over a range of scales), Sites (the method at each
perturbable site, one column each; a click puts that site into a configuration) and Results (an eval/tune OUT
folder). A generation runs in a worker thread so the page can show one progress bar per row and Cancel can stop
it after the running step; its error, if the request is refused, is the CLI's message and nothing is drawn.
"""
from __future__ import annotations

import html
import os
import threading

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402

from ..methods import METHODS  # noqa: E402
from . import core  # noqa: E402

ALL_CLASSES = "0..9 along the columns"
# a pipeline folder's grid is not a `pagkit sample` run (it has no prompt): the page then shows the Python
COMMAND_LABEL = "The same {} from the command line (for a pipeline folder: the Python, through pagkit.attach)"
_CANCELS: dict[str, threading.Event] = {}  # per browser session: the running generation's cancel flag
CSS = """
#compare-progress table, #strip-progress table, #sites-progress table { width: 100%; border-collapse: collapse; }
#compare-progress td, #strip-progress td, #sites-progress td { padding: 1px 6px; font-size: 13px; }
#compare-progress progress, #strip-progress progress, #sites-progress progress { width: 100%; }
.studio-error { color: #b00020; font-weight: 600; }
"""



def _run_controls(label: str, tab: str, go_id: str | None = None, cancel_id: str | None = None):
    """A tab's run button and Cancel in one row, then its error and progress panes (ids ``<tab>-error``,
    ``<tab>-progress``; the run button ``<tab>-generate`` unless named)."""
    with gr.Row():
        go = gr.Button(label, variant="primary", elem_id=go_id or f"{tab}-generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id=cancel_id)
    return go, cancel, gr.HTML(elem_id=f"{tab}-error"), gr.HTML(elem_id=f"{tab}-progress")

def _bars(labels: list[str], done: dict[int, tuple[int, int]], steps: int, note: str = "") -> str:
    """One progress bar per row (configuration) of the running grid."""
    cells = []
    for i, label in enumerate(labels):
        step, total = done.get(i, (0, steps))
        cells.append(f"<tr><td style='width:40%'>{html.escape(label.replace(chr(10), ' '))}</td>"
                     f"<td><progress max='{total}' value='{step}'></progress></td><td>{step}/{total}</td></tr>")
    return f"<table>{''.join(cells)}</table>" + (f"<p>{html.escape(note)}</p>" if note else "")


def _error(text: str) -> str:
    return f"<span class='studio-error'>{html.escape(text)}</span>" if text else ""


def _drive(session: str, make_plan):
    """Check (``make_plan``), then draw in a worker thread; yields ("start", html) (the page clears the last
    grid and error), ("progress", html) while it runs, then one of ("done", result), ("error", message)."""
    try:
        plan = make_plan()
    except core.StudioError as err:
        yield "error", str(err)
        return
    cancel = threading.Event()
    _CANCELS[session] = cancel
    done: dict[int, tuple[int, int]] = {}
    box: dict[str, object] = {}

    def work():
        try:
            box["result"] = core.draw(plan, progress=lambda row, step, steps: done.__setitem__(row, (step, steps)),
                                      cancel=cancel)
        except core.Cancelled as err:
            box["error"] = str(err)
        except (ValueError, TypeError, RuntimeError) as err:  # e.g. NonFiniteGuidance: the library's message
            box["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__

    labels = [label for label, _ in plan.rows]
    worker = threading.Thread(target=work, daemon=True, name="pagkit-studio-draw")
    worker.start()
    yield "start", _bars(labels, done, plan.args.steps)
    while worker.is_alive():
        yield "progress", _bars(labels, done, plan.args.steps)
        worker.join(0.25)
    if _CANCELS.get(session) is cancel:
        del _CANCELS[session]
    if "error" in box:
        yield "error", box["error"]
    else:
        yield "done", box["result"]
        yield "progress", _bars(labels, done, plan.args.steps,
                                f"{len(labels)} rows x {plan.args.num_images} seeds, {plan.args.steps} steps")


def _request(model, scheduler, steps, seed, seeds, klass, prompt, negative, configs=()) -> core.Request:
    label = None if klass in (None, "", ALL_CLASSES) else klass
    return core.Request(model=model, configs=list(configs), seed=seed, num_images=seeds, scheduler=scheduler,
                        steps=steps, class_label=label, prompt=prompt, negative_prompt=negative)


def build(models_root=None, files_root=None, model: str = core.DEFAULT_MODEL) -> gr.Blocks:
    """The page. ``models_root``: diffusers folders it may open besides the shipped models (None: none);
    ``files_root``: where preset files and OUT folders may be opened from (None: nowhere)."""
    roots = {"models_root": models_root, "files_root": files_root}

    def cancel_run(request: gr.Request):
        event = _CANCELS.get(request.session_hash)
        if event is not None:
            event.set()

    with gr.Blocks(title="pagkit studio", analytics_enabled=False) as page:
        gr.Markdown("## pagkit studio\nAttention-perturbation guidance side by side. Every grid is a "
                    "`pagkit sample` run (a pipeline folder's: the pipeline under `pagkit.attach`); its command "
                    "line (or Python) is shown under it.")
        with gr.Row():
            model_box = gr.Dropdown(core.list_models(models_root), value=model, label="Model",
                                    allow_custom_value=models_root is not None, elem_id="model", scale=2)
            scheduler = gr.Dropdown(sorted(core.SCHEDULERS), value=core.DEFAULT_SCHEDULER, label="Sampler",
                                    elem_id="scheduler")
            steps = gr.Number(core.DEFAULT_STEPS, label="Steps", precision=0, elem_id="steps")
            seed = gr.Number(0, label="Seed (first column's noise)", precision=0, elem_id="seed")
            seeds = gr.Number(core.DEFAULT_SEEDS, label=f"Seeds (columns, at most {core.MAX_SEEDS})", precision=0,
                              elem_id="seeds")
            klass = gr.Dropdown([ALL_CLASSES], value=ALL_CLASSES, label="Class", visible=False, elem_id="class")
        with gr.Row(visible=False) as prompt_row:  # a text-to-image pipeline's condition, shown only for one
            prompt = gr.Textbox(label="Prompt", elem_id="prompt", scale=3)
            negative = gr.Textbox(label="Negative prompt (optional)", elem_id="negative", scale=2)
        model_error = gr.HTML(elem_id="model-error")
        shared = [model_box, scheduler, steps, seed, seeds, klass, prompt, negative]

        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("Up to six configurations, each a `--guidance` spec (`pag:1,layers=mid`, "
                            "`cfg:2; seg:1`, lists joined by `+`), a preset file (`.json`, from `pagkit tune`) "
                            "or a shipped preset by name (`fmnist:pag`, `fmnist:seg`); the unguided row comes "
                            "first, presets after the specs, as in `pagkit sample`.")
                with gr.Row():
                    method = gr.Dropdown(list(METHODS), value="pag", label="Method", scale=1)
                    insert = gr.Button("Put its defaults into the first empty configuration", scale=2)
                configs = []
                with gr.Row():
                    for column in range(2):
                        with gr.Column():
                            for i in range(column * 3, column * 3 + 3):
                                default = core.DEFAULT_CONFIGS[i] if i < len(core.DEFAULT_CONFIGS) else ""
                                configs.append(gr.Textbox(default, label=f"Configuration {i + 1}",
                                                          placeholder="pag:1,layers=mid  or  fmnist:pag  or  runs/tune/preset.json",
                                                          elem_id=f"config-{i}"))
                generate, cancel, compare_error, compare_progress = _run_controls("Generate", "compare",
                                                                                  go_id="generate", cancel_id="cancel")
                gr.Markdown("Rows: configurations, with seconds per image in each label; columns: the same seeds.")
                compare_grid = gr.Image(type="pil", format="png", interactive=False, elem_id="compare-grid",
                                        show_label=False)
                compare_table = gr.Dataframe(headers=["row", "label", "guidance", "s/image"], interactive=False,
                                             elem_id="compare-table")
                compare_command = gr.Textbox(label=COMMAND_LABEL.format("grid"), interactive=False, max_lines=30,
                                             buttons=["copy"], elem_id="compare-command")

            with gr.Tab("Scale strip", id="strip"):
                gr.Markdown("One method over a range of scales, the same seeds in every row: where saturation "
                            "begins (mean pixel and the share of near-white pixels per row). With several terms "
                            "(`cfg:1.5; pag:1`) the last one's scale varies.")
                with gr.Row():
                    strip_spec = gr.Textbox("pag:1,layers=mid", label="Method", elem_id="strip-spec")
                    strip_scales = gr.Textbox("0.5:8:5", label="Scales: a,b,c or start:stop:count",
                                              elem_id="strip-scales")
                strip_go, strip_cancel, strip_error, strip_progress = _run_controls("Draw the strip", "strip")
                gr.Markdown("Rows: scales; columns: the same seeds.")
                strip_grid = gr.Image(type="pil", format="png", interactive=False, elem_id="strip-grid",
                                      show_label=False)
                strip_table = gr.Dataframe(headers=["row", "label", "mean pixel", "near-white %", "s/image"],
                                           interactive=False, elem_id="strip-table")
                strip_command = gr.Textbox(label=COMMAND_LABEL.format("strip"), interactive=False, max_lines=30,
                                           buttons=["copy"], elem_id="strip-command")

            with gr.Tab("Sites", id="sites"):
                gr.Markdown("The method at each perturbable site (`pagkit layers`), one column per site, the "
                            "same seeds; click a column to put its site into a configuration of Compare.")
                with gr.Row():
                    sites_spec = gr.Textbox("pag:1", label="Method (its layers are set per column)",
                                            elem_id="sites-spec")
                    target = gr.Dropdown([str(i + 1) for i in range(core.MAX_CONFIGS)], value="1",
                                         label="A click puts the site into configuration", elem_id="sites-target")
                sites_go, sites_cancel, sites_error, sites_progress = _run_controls("Draw one column per site",
                                                                                    "sites")
                gr.Markdown("One column per site (the unguided one first), the same seeds top to bottom; click one.")
                sites_grid = gr.Image(type="pil", format="png", interactive=False, show_label=False,
                                      elem_id="sites-grid")
                sites_status = gr.Markdown(elem_id="sites-status")
                sites_command = gr.Textbox(label=COMMAND_LABEL.format("columns (as grid rows)"), interactive=False,
                                           max_lines=30, buttons=["copy"], elem_id="sites-command")
                sites_state = gr.State([])

            with gr.Tab("Results", id="results"):
                gr.Markdown("An OUT folder of `pagkit eval` or `pagkit tune` (under the studio's `--files-root`): "
                            "its results.md / tune.md and its plots and grids.")
                with gr.Row():
                    folder = gr.Dropdown(core.list_results(files_root), value=None, allow_custom_value=True,
                                         label="OUT folder", elem_id="results-folder", scale=3)
                    open_folder = gr.Button("Open", variant="primary", elem_id="results-open")
                    refresh = gr.Button("Refresh the list")
                results_error = gr.HTML(elem_id="results-error")
                results_text = gr.Markdown(elem_id="results-text")
                results_gallery = gr.Gallery(format="png", columns=3, object_fit="contain", height="auto", preview=False,
                                             label="plots and grids", elem_id="results-gallery")

        # ---- callbacks: each one calls core and shows its return ----
        def on_model(name):  # the model's condition: a class, a prompt, or none
            no_class = gr.update(visible=False, choices=[ALL_CLASSES], value=ALL_CLASSES)
            try:
                kind, labels = core.condition(name, models_root)
            except core.StudioError as err:
                return no_class, gr.update(visible=False), _error(str(err))
            text = gr.update(visible=kind == "prompt")
            if kind != "class":
                return no_class, text, ""
            return (gr.update(visible=True, choices=[ALL_CLASSES] + [str(c) for c in labels], value=ALL_CLASSES),
                    text, "")

        model_box.change(on_model, [model_box], [klass, prompt_row, model_error])
        page.load(on_model, [model_box], [klass, prompt_row, model_error])

        def on_insert(name, *texts):
            try:
                template = core.method_template(name)
            except core.StudioError as err:
                return [gr.update()] * len(texts) + [_error(str(err))]
            empty = next((i for i, t in enumerate(texts) if not (t or "").strip()), None)
            if empty is None:
                return [gr.update()] * len(texts) + [_error("every configuration is in use; clear one first")]
            return [gr.update(value=template) if i == empty else gr.update() for i in range(len(texts))] + [""]

        insert.click(on_insert, [method] + configs, configs + [compare_error])

        # (explicit parameters: Gradio passes gr.Request only to a parameter it can see in the signature)
        def on_compare(model, scheduler, steps, seed, seeds, klass, text, negative, c1, c2, c3, c4, c5, c6,
                       request: gr.Request):
            req = _request(model, scheduler, steps, seed, seeds, klass, text, negative,
                           configs=[c1, c2, c3, c4, c5, c6])
            for kind, value in _drive(request.session_hash, lambda: core.plan(req, **roots)):
                if kind == "start":  # the last grid goes: what shows is always what the command line draws
                    yield "", value, None, None, ""
                elif kind == "progress":
                    yield gr.update(), value, gr.update(), gr.update(), gr.update()
                elif kind == "error":  # refused or cancelled: the message, and no grid
                    yield _error(value), "", None, None, ""
                else:
                    yield "", gr.update(), value.grid, value.table(), value.command

        generate.click(on_compare, shared + configs,
                       [compare_error, compare_progress, compare_grid, compare_table, compare_command],
                       show_progress="hidden")

        def on_strip(model, scheduler, steps, seed, seeds, klass, text, negative, spec, scales,
                     request: gr.Request):
            def make_plan():
                req = core.strip_request(_request(model, scheduler, steps, seed, seeds, klass, text, negative), spec,
                                         scales)
                return core.plan(req, max_configs=core.MAX_SCALES, **roots)
            for kind, value in _drive(request.session_hash, make_plan):
                if kind == "start":
                    yield "", value, None, None, ""
                elif kind == "progress":
                    yield gr.update(), value, gr.update(), gr.update(), gr.update()
                elif kind == "error":
                    yield _error(value), "", None, None, ""
                else:
                    table = [[i, r.label.replace("\n", " "), round(r.mean_pixel, 3), round(100 * r.white_fraction, 1),
                              round(r.seconds_per_image, 4)] for i, r in enumerate(value.rows)]
                    yield "", gr.update(), value.grid, table, value.command

        strip_go.click(on_strip, shared + [strip_spec, strip_scales],
                       [strip_error, strip_progress, strip_grid, strip_table, strip_command], show_progress="hidden")

        def on_sites(model, scheduler, steps, seed, seeds, klass, text, negative, spec, request: gr.Request):
            found: dict[str, list] = {}

            def make_plan():
                req, found["sites"] = core.sites_request(
                    _request(model, scheduler, steps, seed, seeds, klass, text, negative), spec,
                    models_root=models_root)
                return core.plan(req, max_configs=len(found["sites"]), **roots)
            for kind, value in _drive(request.session_hash, make_plan):
                if kind == "start":
                    yield "", value, None, [], ""
                elif kind == "progress":
                    yield gr.update(), value, gr.update(), gr.update(), gr.update()
                elif kind == "error":
                    yield _error(value), "", None, [], ""
                else:
                    cols = core.columns(value, found["sites"])
                    image, spans = core.sites_grid(cols)
                    yield "", gr.update(), image, [(site, spec, span) for (site, spec, _), span in zip(cols, spans)], \
                        value.command

        sites_go.click(on_sites, shared + [sites_spec],
                       [sites_error, sites_progress, sites_grid, sites_state, sites_command],
                       show_progress="hidden")

        def on_pick(state, slot, evt: gr.SelectData):  # evt.index: the click's [x, y] in image pixels
            column = core.column_at([span for _, _, span in state], evt.index[0]) if state and evt.index else None
            if column is None:
                return [gr.update()] * len(configs) + [""]
            site, spec, _ = state[column]
            index = int(slot) - 1
            text = "" if site is None else spec
            note = (f"configuration {index + 1}: `{text}`" if site else
                    f"configuration {index + 1} cleared (the unguided row is always drawn)")
            return [gr.update(value=text) if i == index else gr.update() for i in range(len(configs))] + [note]

        sites_grid.select(on_pick, [sites_state, target], configs + [sites_status])

        for button in (cancel, strip_cancel, sites_cancel):
            button.click(cancel_run, None, None, queue=False)

        def on_open(name):
            try:
                found = core.read_results(name, files_root)
            except core.StudioError as err:
                return _error(str(err)), "", []
            return "", found.markdown, [(image, caption) for image, caption in found.images]

        open_folder.click(on_open, [folder], [results_error, results_text, results_gallery])
        refresh.click(lambda: gr.update(choices=core.list_results(files_root)), None, [folder])
    return page
