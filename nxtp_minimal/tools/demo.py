"""`python -m nxtp_minimal demo`: a Gradio page where one-shot sampling can be watched on any image.

One request is one `inference.sample(..., attention=True)` call: the ranked labels, the step view (the k
branches growing token by token) and the label-conditioned attention overlays all come from it. The
API endpoint `/predict` answers with the list `predict --json` prints. Nothing reaches the internet (no
analytics, no share link, system fonts), so the page works offline like the rest of the repo.
"""

import argparse
import functools
import html
import sys
import time
from pathlib import Path

import numpy as np

from .. import inference, sampling
from ..preprocess import MAX_PIXELS, load_image, resize_and_crop
from ..training.scenes import LABELS
from .errors import DTYPES, USER_ERRORS, UserError, check_device, message
from .plot import heat_on_image

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "lessons" / "images").glob("scene_*.png"))
MAX_TOP_K = 50  # the page draws a row and an overlay per branch; more would not be read
OVERLAY_SIZE = 256
STEPS_CSS = """
table { border-collapse: collapse; font-size: 15px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td small { color: #777; margin-left: 4px; }
td.end { background: #d8f0d8; }
td.cut { background: #f6dfcf; }
"""


def _gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("the demo page needs gradio: pip install -e .[demo]") from None
    return gradio


def _shown_on_page(fn):
    """The errors the command line prints as one line become a message on the page, and the server goes on."""

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except USER_ERRORS as e:
            raise _gradio().Error(html.escape(message(e), quote=False), print_exception=False) from None

    return run


def open_upload(upload, max_pixels=None):
    """The uploaded file as a PIL image, opened by `load_image` so that the command line's checks apply.

    upload: Gradio's file record, a dict with "path" and "orig_name". The events run with
    preprocess=False: Gradio would otherwise open the file itself first, with other checks and errors.
    """
    path = upload.get("path") if upload else None
    if not path:
        raise UserError("no image given: upload, paste or take a picture")
    try:
        return load_image(path, max_pixels)
    except ValueError as e:  # name the file as the user knows it, not by its copy on the server
        raise ValueError(str(e).replace(path, upload.get("orig_name") or "the upload")) from None


def check_top_k(model, top_k) -> int:
    limit = min(MAX_TOP_K, model.config.language.vocab_size)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k != int(top_k) or not 1 <= top_k <= limit:
        raise UserError(f"top-k must be a whole number between 1 and {limit}, got {top_k!r}")
    return int(top_k)


def step_view(tokenizer, tokens, probs) -> str:
    """One image's branches, tokens and probs [k, T], as an HTML table: a row per branch, a column per step."""
    delimiter = tokenizer.delimiter_id
    branches = sampling.branch_labels(tokens, probs, delimiter)
    rows = []
    for b, (ids, ps, (label_ids, score)) in enumerate(zip(tokens.tolist(), probs.tolist(), branches)):
        # the sampler stops a branch at a delimiter written at its second token or later (sampling.one_shot);
        # what a finished row holds after that is not part of the branch
        end = next((t + 1 for t in range(1, len(ids)) if ids[t] == delimiter), None)
        shown = [f"{html.escape(tokenizer.decode([i]))}<small>{p:.2f}</small>" for i, p in zip(ids[:end], ps)]
        last = '<td class="end">&#10003; ' if end else '<td class="cut">'
        cells = [f"<td>{c}</td>" for c in shown[:-1]] + [f"{last}{shown[-1]}</td>"]
        cells += ["<td></td>"] * (len(ids) - len(shown))
        label = html.escape(sampling.label_text(label_ids, tokenizer.decode, tokenizer.decode([delimiter])))
        note = "" if end else " (no delimiter: cut at the token limit)"
        # the ranking cuts a branch at its first delimiter, even the first token (kaiyuyue/nxtp src/decoding.py
        # `OneShotDecoder.finalize`, sampling.branch_labels); the sampler did not stop it there
        if not label:
            note = "(empty: the first token is the delimiter)"
        rows.append(f"<tr><td>{b + 1}</td>{''.join(cells)}<td><b>{label}</b>{note}</td><td>{score:.4f}</td></tr>")
    head = "".join(f"<th>step {t + 1}</th>" for t in range(tokens.shape[1]))
    return f"<table><tr><th>branch</th>{head}<th>label</th><th>p(label)</th></tr>{''.join(rows)}</table>"


def analyse(model, image, k: int, readout: str = "last"):
    """Everything the page shows for one image, from one `sample` call: labels, step view, overlays, timing.
    readout="gradient": the overlays are `inference.attention_maps(..., readout="gradient")`, one more pass."""
    start = time.perf_counter()
    tokens, probs, _, attention = inference.sample(model, inference.pixels(model, image), k, attention=True)
    sampled = time.perf_counter() - start
    tokens, probs, attention = tokens[0].cpu(), probs[0].cpu(), attention[0].float().cpu()
    ranked = inference.rank(model, tokens, probs)
    maps = inference.label_maps(model, tokens, probs, attention) if readout == "last" else \
        inference.attention_maps(model, image, [label for label, _ in ranked], readout)
    crop = resize_and_crop(image, OVERLAY_SIZE)  # the square the model sees
    overlays = [
        ((heat_on_image(crop, maps[label].mean(dim=(0, 1))) * 255).round().astype(np.uint8), f"{label}  {p:.2f}")
        for label, p in ranked
    ]
    steps = step_view(model.tokenizer, tokens, probs)
    status = (
        f"**{time.perf_counter() - start:.3f} s** for this image on {model.device} "
        f"({str(model.dtype).removeprefix('torch.')}): {sampled:.3f} s in one `sample` call ({k} branches, "
        f"{tokens.shape[1]} steps), the rest for ranking, step view and overlays"
    )
    return dict(ranked), steps, overlays, status


def about(model, weights) -> str:
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    if weights is not None:
        return f"Serving `{weights}` ({size})."
    return (
        f"Serving the **demo model** (no `--weights` given; {size}, trained by this repo on synthetic scenes). "
        f"It knows {len(LABELS)} kinds of object and answers with them whatever the image: {', '.join(LABELS)}."
    )


def build_app(model, weights=None, max_pixels=None, examples=EXAMPLES, readout="last"):
    """The demo page for `model` as a `gradio.Blocks`.

    weights: the file the model came from, named on the page (None: the demo model). max_pixels: the
    largest upload, as for `load_image`. examples: image files one click away. readout: the overlays' map
    (`inference.READOUTS`).
    """
    gr = _gradio()
    limit = min(MAX_TOP_K, model.config.language.vocab_size)

    @_shown_on_page
    def on_input(upload, top_k):
        if upload is None:  # the image was removed: clear the page
            return None, "", [], ""
        return analyse(model, open_upload(upload, max_pixels), check_top_k(model, top_k), readout)

    @_shown_on_page
    def predict(upload, top_k):
        image, k = open_upload(upload, max_pixels), check_top_k(model, top_k)
        return [{"label": label, "prob": p} for label, p in model.predict(image, k=k)[0]]

    with gr.Blocks(title="NXTP demo", analytics_enabled=False) as app:  # no telemetry, no online version check
        gr.Markdown(
            "# Object Recognition as Next Token Prediction\n"
            "Drop an image: the model writes k labels at once (one-shot sampling), ranks them by probability, "
            "and shows where each label looks in the image. " + about(model, weights)
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="image",
                                 height=300, elem_id="image")
                top_k = gr.Slider(1, limit, value=min(10, limit), step=1, elem_id="top_k",
                                  label="top-k: branches, i.e. labels asked for")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="example scenes")
            with gr.Column(scale=3):
                labels = gr.Label(label="ranked labels", elem_id="labels")
                status = gr.Markdown(elem_id="status")
        gr.Markdown(
            "### One-shot sampling, step by step\n"
            "Each row is a branch. Step 1 takes the k most likely first tokens at the answer position; every "
            "later step feeds all live branches at once and appends each one's most likely next token (its "
            "probability in grey). A branch is done (&#10003;) when it writes the delimiter `,`; p(label) "
            "multiplies its token probabilities, and branches with the same text are summed in the ranking."
        )
        steps = gr.HTML(css_template=STEPS_CSS, elem_id="steps")
        gr.Markdown(
            "### Where each label looks\n"
            + ("The attention of the label's last token (the one that predicts the delimiter, so it has read the "
               "whole label) to the image patches, averaged over decoder blocks and heads; bright = more. "
               if readout == "last" else
               "Gradient-weighted attention: each block's attention times the gradient of the label's "
               "log-probability with respect to it, clipped at 0, rolled out over the blocks; bright = more. ")
            + f"Read-out: `{readout}` ({inference.READOUTS[readout]}). Click one to enlarge."
        )
        overlays = gr.Gallery(label="attention per label", columns=5, height="auto", object_fit="contain",
                              elem_id="overlays")
        answer = gr.JSON(visible=False)  # /predict answers API clients; the page shows the labels above
        gr.on([image.change, top_k.release], on_input, [image, top_k], [labels, steps, overlays, status],
              preprocess=False, api_visibility="private")
        gr.on([], predict, [image, top_k], [answer], preprocess=False, api_name="predict")
    return app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal demo", description="Serve the NXTP demo page (Gradio).")
    p.add_argument("--weights", help="NXTP safetensors file (default: the demo model in weights/)")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-pixels", type=int, help=f"largest upload in pixels (default {MAX_PIXELS}; 0: no limit)")
    p.add_argument("--readout", choices=list(inference.READOUTS), default="last",
                   help="the overlays: last: the attention of each label's last token; gradient: gradient-weighted "
                        "attention, the map that points at the named object (lesson 13)")
    return p


def main(argv=None) -> None:
    from .. import weights

    args = parser().parse_args(argv)
    gr = _gradio()
    device = check_device(args.device)
    if args.max_pixels is not None and args.max_pixels < 0:
        raise UserError(f"--max-pixels must be 0 (no limit) or a number of pixels, got {args.max_pixels}")
    model = weights.load_for_command(args.weights, args.tokenizer, device, args.dtype, "serving")
    app = build_app(model, args.weights, args.max_pixels, readout=args.readout)
    # system fonts: a theme with web fonts makes the browser fetch them; share=False even where GRADIO_SHARE
    # or a notebook would open a public tunnel
    system_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["monospace"])
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, theme=system_fonts)
    except OSError as e:
        reason = str(e).split(". ")[0]
        raise UserError(f"cannot serve on {args.host}:{args.port} ({reason}): pick another --port") from None
