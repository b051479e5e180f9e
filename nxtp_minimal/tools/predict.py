"""`python -m nxtp_minimal predict`: label images, folders and data sets with NXTP.

Inputs are image files, folders (searched recursively), glob patterns and lists of paths (--files-from),
labelled in the order given. DataLoader workers decode and preprocess the next batches while the model
labels this one. A file that cannot be read costs one line on stderr and one failed row; the rest of
the run goes on, and the exit status is 1. Results go to stdout, laid out like the official script
(kaiyuyue/nxtp src/infer.py) or as one JSON array, or with --out to a JSON-lines file that grows batch by
batch, so that running the same command again resumes where a killed run stopped. Under torchrun each
rank labels its share of the list into OUT.rankR, and rank 0 merges those into OUT.
"""

import argparse
import functools
import glob
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .. import inference
from ..preprocess import load_image, preprocess, resize_and_crop
from .dist import distributed, world_size
from .errors import DTYPES, UserError, check_device, check_exists

FIGURE_SIZE = 256  # pixels of the image in an --attention-maps figure


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal predict", description="Label images with NXTP.")
    p.add_argument("images", nargs="*", help="image files, folders (searched recursively) or quoted glob patterns")
    p.add_argument("--files-from", metavar="LIST", help="a text file with one image path per line (- for stdin)")
    p.add_argument("--weights", help="NXTP safetensors file (default: the demo model in weights/)")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights")
    p.add_argument("--top-k", type=int, default=10, help="number of branches, i.e. labels asked for")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: run the graphs of `export onnx` in onnxruntime (needs --onnx DIR, pip install -e .[onnx])")
    p.add_argument("--onnx", metavar="DIR", help="folder written by python -m nxtp_minimal export onnx")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--autocast", choices=["bfloat16", "float16"],
                   help="run the model under torch.autocast in this dtype, the official regime (its src/infer.py: "
                        "--dtype float16 --autocast float16 on a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of the table")
    # CPU 16: the demo model on a 2-core CPU labels the most images per second at 8-16 (docs/labelling.md),
    # a killed run loses at most 16, and --attention-maps holds 16 images' maps; a GPU runs a batch of 64
    # in about the time of one image (docs/performance.md)
    p.add_argument("--batch-size", type=int, help="images per model call (default: 16 on a CPU, 64 on a GPU)")
    p.add_argument("--decode", choices=inference.DECODES,
                   help="static: fixed-shape steps, captured as one CUDA graph on a GPU (the GPU default); dynamic: "
                        "only the branches still running (the CPU default, faster there)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that decode and preprocess images while the model works "
                        "(default: min(4, CPU cores); 0: the main process does it)")
    p.add_argument("--max-pixels", type=int, help="largest image in pixels (default: Pillow's limit; 0: none)")
    p.add_argument("--out", help="append one JSON object per image to this file (JSON lines); a rerun resumes")
    p.add_argument("--attention-maps", metavar="DIR", help="write DIR/<image stem>.png (a stem seen before gets -2, "
                   "-3, ...): the image and where each label attends")
    p.add_argument("--readout", choices=list(inference.READOUTS), default="last",
                   help="the map --attention-maps draws: last: the attention of each label's last token, from the "
                        "sampling call; gradient: gradient-weighted attention, one more pass per image, the map that "
                        "points at the named object (lesson 13)")
    return p


@functools.cache
def image_extensions() -> frozenset:
    """File extensions of the formats Pillow reads (Image.OPEN; MPO files open through its JPEG reader)."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO")


def folder_images(folder) -> list:
    """Every file under `folder` with an image extension, sorted."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if os.path.splitext(name)[1].lower() in image_extensions())


def expand(item: str) -> list:
    """One input: a folder's images, a glob pattern's matches (`**` recursive), or the file itself."""
    if os.path.isdir(item):
        found = folder_images(item)
        if not found:
            raise UserError(f"no images in folder {item} (searched recursively for extensions Pillow reads, "
                            ".jpg, .png, .webp, ...)")
        return found
    if os.path.exists(item) or not any(c in item for c in "*?["):
        return [item]  # a missing file is one failed image, like an unreadable one
    found = [path for match in sorted(glob.glob(item, recursive=True))
             for path in (folder_images(match) if os.path.isdir(match) else [match])
             if os.path.splitext(path)[1].lower() in image_extensions()]
    if not found:
        raise UserError(f"no images match the pattern {item}")
    return found


def image_paths(inputs: list, files_from=None) -> list:
    """The images to label: `inputs` expanded, then the lines of `files_from` (a file or "-" for stdin),
    in that order, each once (the first spelling of a path is kept)."""
    paths = [path for item in inputs for path in expand(item)]
    if files_from is not None:
        if files_from == "-":
            lines = sys.stdin.read().splitlines()
        else:
            listing = check_exists(files_from, "--files-from list", "Give a text file with one image path per line")
            with open(listing) as f:
                lines = f.read().splitlines()
        paths += [line.strip() for line in lines if line.strip()]
    if not paths:
        raise UserError("no images given: name image files, folders or quoted glob patterns, or --files-from LIST")
    unique = {}
    for path in paths:
        unique.setdefault(os.path.normpath(path), path)
    return list(unique.values())


def figure_files(paths: list, folder) -> dict:
    """path -> folder/<stem>.png; a stem seen before gets the first free -2, -3, ... instead, so no figure
    overwrites another. Made from the whole input list, so every rank and every rerun names alike."""
    stems = [Path(p).stem for p in paths]
    taken, next_n, files = set(stems), {}, {}
    for path, stem in zip(paths, stems):
        name = stem
        if stem in next_n:
            n = next_n[stem]
            while f"{stem}-{n}" in taken:
                n += 1
            name, next_n[stem] = f"{stem}-{n}", n + 1
            taken.add(name)
        next_n.setdefault(stem, 2)
        files[path] = os.path.join(folder, name + ".png")
    return files


class Images(torch.utils.data.Dataset):
    """Item i: (path, pixels [3, S, S], crop, None), or (path, None, None, error message) for a file that
    cannot be read: a worker never raises for one file, so one bad file among thousands costs one row.
    crop: the image at FIGURE_SIZE for --attention-maps, else None."""

    def __init__(self, paths: list, size: int, max_pixels=None, crops: bool = False):
        self.paths, self.size, self.max_pixels, self.crops = paths, size, max_pixels, crops

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = load_image(path, self.max_pixels)
            crop = resize_and_crop(image, FIGURE_SIZE) if self.crops else None
            return path, preprocess(image, self.size), crop, None
        except Exception as e:  # load_image's clear messages; anything else a decoder raises is named
            known = isinstance(e, (OSError, ValueError))
            return path, None, None, str(e) if known else f"cannot read {path} as an image ({e!r})"


def load_model(args, device: str, announce: bool = True):
    """The model to label with. `predict` uses it only through inference.py (.config, .tokenizer, .sampler)
    on preprocessed pixels, so another engine with those fits here."""
    from .. import weights

    if args.engine == "torch":
        if args.onnx is not None:
            raise UserError("--onnx DIR is read with --engine onnx: add it, or drop --onnx")
        return weights.load_for_command(args.weights, args.tokenizer, device, args.dtype,
                                        "using" if announce else None)
    from .onnx_engine import OnnxNXTP

    if args.onnx is None:
        raise UserError("--engine onnx needs --onnx DIR, a folder written by python -m nxtp_minimal export onnx")
    if args.weights or args.tokenizer or args.attention_maps or device != "cpu" or args.dtype != "float32":
        raise UserError("--engine onnx takes the model, tokenizer and dtype from --onnx DIR and runs on the CPU "
                        "without attention: drop --weights, --tokenizer, --dtype, --device and --attention-maps")
    model = OnnxNXTP(args.onnx)
    if model.tokenizer is None:
        raise UserError(f"the export in {args.onnx} has no tokenizer: export again with --tokenizer")
    return model


def label_batch(model, pixels, k: int, attention=False, options: dict = None) -> list:
    """One `inference.sample` call on pixels [B, 3, S, S]: per image (ranked [(label, prob)], maps), where maps
    (attention True or "last", else None) gives each ranked label its attention [blocks, heads, grid, grid] from
    that same call (`inference.label_maps`); attention="gradient" gives its gradient-weighted map
    (`inference.attention_maps`, one more pass). options: more arguments of `inference.sample` (decode, autocast)."""
    gradient = attention == "gradient"
    attention = bool(attention)
    out = inference.sample(model, pixels, k, attention=attention and not gradient, **(options or {}))
    tokens, probs = out[0].cpu(), out[1].cpu()
    maps_of = out[3].float().cpu() if attention and not gradient else None  # [B, k, T - 1, blocks, heads, grid, grid]
    results = []
    for b in range(tokens.shape[0]):
        ranked, maps = inference.rank(model, tokens[b], probs[b]), None
        if gradient:
            maps = inference.attention_maps(model, pixels[b : b + 1], [label for label, _ in ranked], "gradient")
        elif attention:
            every = inference.label_maps(model, tokens[b], probs[b], maps_of[b])
            maps = {label: every[label] for label, _ in ranked}
        results.append((ranked, maps))
    return results


def save_figure(path, crop, maps: dict, probs: dict, readout: str = "last") -> None:
    import matplotlib.pyplot as plt

    from .plot import attention_figure

    fig = attention_figure(crop, maps, probs, FIGURE_SIZE, caption=inference.READOUTS[readout])
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def label(model, paths: list, k: int, batch_size: int = 16, workers: int = 0, max_pixels=None, figures=None,
          progress: bool = True, options: dict = None, readout: str = "last"):
    """Label `paths`, yielding each batch's rows in input order: {"image", "labels": [{"label", "prob"}]},
    or {"image", "error"} for a file that could not be read (also printed on stderr as it happens).

    figures: path -> PNG file for each image's attention figure, or None for no figures; readout: which map it
    draws (`inference.READOUTS`).
    """
    data = Images(paths, model.config.vision.image_size, max_pixels, figures is not None)
    # one batch gains nothing from workers, and starting them costs more than a small image
    loader = torch.utils.data.DataLoader(data, batch_size, num_workers=workers if len(paths) > batch_size else 0,
                                         collate_fn=list)
    # None: only on a terminal, so that a log or a pipe gets the error lines alone
    shown = None if progress and len(paths) > 1 else True
    with tqdm(total=len(paths), unit="img", disable=shown, file=sys.stderr) as bar:
        for batch in loader:
            good = [item for item in batch if item[3] is None]
            pixels = torch.stack([item[1] for item in good]) if good else None
            drawn = readout if figures is not None else False
            results = iter(label_batch(model, pixels, k, drawn, options) if good else [])
            rows = []
            for path, _, crop, error in batch:
                if error is not None:
                    bar.write(f"error: {error}", file=sys.stderr)
                    rows.append({"image": path, "error": error})
                    continue
                ranked, maps = next(results)
                rows.append({"image": path, "labels": [{"label": lab, "prob": p} for lab, p in ranked]})
                if maps is not None:
                    save_figure(figures[path], crop, maps, dict(ranked), readout)
            bar.update(len(batch))
            yield rows


def table(row: dict, k: int) -> str:
    """One image's labels in the official script's layout."""
    lines = [f"{row['image']}: top-{k} predictions:"]
    return "\n".join(lines + [f"| prob: {item['prob']:.5f} - {item['label']}" for item in row["labels"]])


def show(batches, as_json: bool, k: int) -> int:
    """Results on stdout: the table as each batch is done (failures only on stderr), or one JSON array
    with a row per image at the end. Returns the number of failed images."""
    rows, failed = [], 0
    for batch in batches:
        failed += sum("error" in row for row in batch)
        if as_json:
            rows += batch
            continue
        for row in batch:
            if "labels" in row:
                tqdm.write(table(row, k), file=sys.stdout)
    if as_json:
        print(json.dumps(rows))
    return failed


def read_rows(path) -> list:
    """The rows of a results file, [] if there is none. A last line left without its newline by a kill and
    cut short is dropped (its image is labelled again)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    break
                row = None
            if not isinstance(row, dict) or "image" not in row:
                raise UserError(f"{path} line {n} is not a result of predict --out: give another --out, or delete "
                                "the file to start again")
            rows.append(row)
    return rows


def write_rows(path, rows: list) -> None:
    """Replace `path` by `rows`, one JSON object per line (through a temporary file, so a kill keeps one)."""
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(f"{path}.tmp", path)


def merge(out, paths: list, world: int) -> None:
    """Rank 0, once every rank is done: each image's row once in OUT, in input order (rows of images this
    run was not given last), and the rank files removed."""
    rows = read_rows(out)
    parts = [f"{out}.rank{r}" for r in range(world)] if world > 1 else []
    if parts:
        rows = [row for row in rows if "labels" in row]  # failed rows were tried again by the ranks
    for part in parts:
        rows += read_rows(check_exists(part, "rank file", "On several machines, --out must be on a filesystem "
                                                          "that all of them share"))
    unique = {}
    for row in rows:
        unique.setdefault(row["image"], row)
    order = {path: i for i, path in enumerate(paths)}
    merged = sorted(unique.values(), key=lambda row: order.get(row["image"], len(order)))
    if merged != rows:
        write_rows(out, merged)
    for part in parts:
        os.remove(part)


def label_into(model, paths: list, args, figures, rank: int, world: int, device: str) -> int:
    """--out: this rank's share of `paths` (every world-th image from its rank on), less the images already
    labelled in OUT or this rank's file, appended batch by batch to OUT (one process) or OUT.rankR; rank 0
    then merges. Failed rows are dropped when a run starts, so a rerun tries those images again.
    Returns the number of failed images over all ranks."""
    mine = args.out if world == 1 else f"{args.out}.rank{rank}"
    kept = [row for row in read_rows(mine) if "labels" in row]
    if os.path.exists(mine):
        write_rows(mine, kept)  # without failed rows and without a line cut short
    done = {row["image"] for row in kept}
    if world > 1:
        done |= {row["image"] for row in read_rows(args.out) if "labels" in row}
    share = paths[rank::world]
    todo = [path for path in share if path not in done]
    failed = 0
    with open(mine, "a") as f:
        for rows in label(model, todo, args.top_k, args.batch_size, args.workers, args.max_pixels, figures, rank == 0,
                          sample_options(args), args.readout):
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()  # a killed run loses at most the batch in flight
            failed += sum("error" in row for row in rows)
    counts = torch.tensor([len(todo) - failed, len(share) - len(todo), failed], device=device)
    if world > 1:
        dist.all_reduce(counts)  # also: every rank has closed its file
    labelled, skipped, failed = counts.tolist()
    if rank == 0:
        merge(args.out, paths, world)
        print(f"results in {args.out}: {labelled} images labelled, {skipped} skipped (already there), {failed} failed")
    if world > 1:
        dist.barrier()  # no rank may exit (with status 1 after failures) while rank 0 merges: torchrun would stop it
    return failed


def sample_options(args) -> dict:
    return dict(decode=args.decode, autocast=None if args.autocast is None else DTYPES[args.autocast])


def make_folder(path, what: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, or no permission
        raise UserError(f"cannot make {what} {path}: {e.strerror}") from None


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.device.startswith("cuda") else 16
    if args.engine == "onnx" and (args.decode == "static" or args.autocast):
        raise UserError("--engine onnx runs the dynamic sampler in the export's dtype: drop --decode static and "
                        "--autocast")
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--max-pixels", args.max_pixels or 0, 0)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    if args.json and args.out:
        raise UserError("--json prints the results, --out writes them to a file: give one of them")
    if world_size() > 1 and args.out is None:
        raise UserError("under torchrun, --out is required: each rank writes OUT.rankR and rank 0 merges them into OUT")
    if world_size() > 1 and args.files_from == "-":
        raise UserError("under torchrun, --files-from needs a file, not -: the ranks cannot share stdin")
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder: give the JSON-lines file to write, e.g. "
                        f"{os.path.join(args.out, 'results.jsonl')}")
    if args.attention_maps and os.path.exists(args.attention_maps) and not os.path.isdir(args.attention_maps):
        raise UserError(f"--attention-maps {args.attention_maps} is a file: give a folder for the PNG files "
                        "(it is made if it does not exist)")
    if args.readout != "last" and not args.attention_maps:
        raise UserError(f"--readout {args.readout} chooses the map --attention-maps draws: add --attention-maps DIR")
    paths = image_paths(args.images, args.files_from)
    figures = None
    if args.attention_maps:
        try:
            import matplotlib
        except ImportError:
            raise UserError("--attention-maps needs matplotlib: pip install matplotlib") from None
        matplotlib.use("Agg")  # files only, no window
        make_folder(args.attention_maps, "--attention-maps")
        figures = figure_files(paths, args.attention_maps)
    if args.out and os.path.dirname(args.out):
        make_folder(os.path.dirname(args.out), "the folder of --out")
    rank, world, device = distributed(check_device(args.device))
    try:
        model = load_model(args, device, announce=rank == 0)
        vocab = model.config.language.vocab_size
        if not 1 <= args.top_k <= vocab:
            raise UserError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {args.top_k}")
        if args.out is None:
            batches = label(model, paths, args.top_k, args.batch_size, args.workers, args.max_pixels, figures,
                            options=sample_options(args), readout=args.readout)
            failed = show(batches, args.json, args.top_k)
        else:
            failed = label_into(model, paths, args, figures, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if failed:
        sys.exit(1)
