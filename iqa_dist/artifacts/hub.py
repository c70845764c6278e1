"""A model directory as a Hugging Face Hub model repo, and Hub repo ids as model directories.

A Hub repo of an iqa-dist model holds the model directory (card.py: `model.safetensors`,
`config.json`, `train_images.json`) plus `README.md`, a model card whose YAML header the Hub
reads: `library_name: iqa-dist`, tags, the datasets trained on, `base_model` (the Hub repo of the
timm weights it started from) and a `model-index` of the test metrics it has, as summary.json and
`evaluate` name them (SRCC as `spearmanr`, PLCC as `pearsonr`, per dataset and split). The
licence is left for the owner to add. Everything Hub-side is huggingface_hub's: `ModelCard` writes
the header, `snapshot_download` resolves a repo id in its cache (HF_HOME / HF_HUB_CACHE; with
HF_HUB_OFFLINE=1 from the cache alone) and `HfApi.upload_folder` pushes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError, first_line
from .card import CARD_FILE, TRAIN_IMAGES_FILE, WEIGHTS_FILE, ModelCard

README = "README.md"
REPO_FILES = [WEIGHTS_FILE, CARD_FILE, TRAIN_IMAGES_FILE, README]  # what a load fetches
TASK = "image-quality-assessment"
METRICS = {"srcc": ("spearmanr", "SRCC"), "plcc": ("pearsonr", "PLCC")}  # ours -> (Hub metric id, shown name)


def is_repo_id(text: str) -> bool:
    """org/name, with @revision optional: what huggingface_hub accepts as a model repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo = text.split("@", 1)[0]
    if repo.count("/") != 1:  # a bare name could be a mistyped local folder: only org/name is taken as a repo
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def resolve(text: str) -> Path:
    """The local snapshot folder of repo id `org/name[@revision]`, downloaded when the Hub is
    reachable and not HF_HUB_OFFLINE, else from the cache alone."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = text.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=REPO_FILES))
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(f"{text}: no such model folder here, and not a Hugging Face repo in the hub cache "
                        f"({constants.HF_HUB_CACHE}; {how}). Fetch it where the Hub answers, with the same HF_HOME: "
                        f"hf download {repo}" + (f" --revision {revision}" if revision else "")) from None
    except (HfHubHTTPError, OSError) as e:  # unknown repo or revision, gated, no access, a broken connection
        raise UserError(f"{text}: no such model folder here, and the Hugging Face Hub did not give it "
                        f"({type(e).__name__}: {first_line(e, 200)})") from None


def write_hub_folder(model: Path, out: Path, name: str, results: list[dict]) -> ModelCard:
    """`model`'s directory as a Hub repo in `out` (created; replaced files): its three files and a
    README.md model card. results: [{"dataset", "split", "metrics"}] test figures for the
    model-index. Returns the card."""
    from huggingface_hub import ModelCard as HubCard

    card = ModelCard.read(model)
    out.mkdir(parents=True, exist_ok=True)
    for file in (WEIGHTS_FILE, CARD_FILE):
        shutil.copyfile(model / file, out / file)
    (out / TRAIN_IMAGES_FILE).write_text(json.dumps(ModelCard.recorded_images(model)))
    header = hub_metadata(card, name, results)
    HubCard(f"---\n{header.to_yaml()}\n---\n\n{readme_body(card, name, results)}").save(out / README)
    return card


def held_out_results(model: Path) -> list[dict]:
    """The test figures of the model in directory `model`: its training run's summary.json (per
    dataset for a joint run) and the `evaluate` reports beside it that scored this model on held-out
    images, as [{"dataset", "split", "metrics"}], one per dataset and split (the summary's first)."""
    from .rundir import RunDir

    card, run, found = ModelCard.read(model), model.parent, {}
    summary = RunDir(run).summary() if RunDir.is_run(run) else None
    if summary and summary.get("test"):
        per = summary.get("datasets") or {card.dataset: {"test": summary["test"]}}
        for name, figures in per.items():
            found[(name, "test")] = figures["test"]
    for file in sorted(run.glob("eval-*.json")):
        report = json.loads(file.read_text())
        overlap = report.get("train_overlap", {})
        if Path(report.get("model", "")).resolve() != model.resolve() or overlap.get("images") \
                or overlap.get("same_content") or overlap.get("checkable") is False:
            continue  # another model's report, or one that scored (or may have scored) training images
        found.setdefault((report["dataset"], report["split"]), report["metrics"])
    return [{"dataset": d, "split": split, "metrics": m} for (d, split), m in found.items()]


def hub_metadata(card: ModelCard, name: str, results: list[dict]):
    """The README's YAML header as huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    backbone = card.model["backbone"]
    evals = [EvalResult(task_type=TASK, task_name="Image quality assessment", dataset_type=r["dataset"],
                        dataset_name=r["dataset"], dataset_split=r["split"], metric_type=hub_id,
                        metric_name=shown, metric_value=round(float(r["metrics"][ours]), 4))
             for r in results for ours, (hub_id, shown) in METRICS.items()
             if r["metrics"].get(ours) is not None and r["metrics"][ours] == r["metrics"][ours]]  # not NaN
    return ModelCardData(library_name="iqa-dist", model_name=name, tags=["image-quality-assessment", "hyperiqa",
                         "iqa-dist", "timm", backbone.split(".")[0]], datasets=list(card.datasets),
                         base_model=base_model(card), eval_results=evals or None)


def base_model(card: ModelCard) -> str | None:
    """The Hub repo of the weights training started from: the timm repo of its pretrained tag, or
    the Hub model it was fine-tuned from; None for a model trained from random weights."""
    weights = card.weights or {}
    if weights.get("repo"):
        return weights["repo"]
    if weights.get("source") in (None, "none"):
        return None
    if weights.get("source") == "import" and "." not in weights.get("tag", ""):
        return None  # its backbone's weights tag is not known (pyiqa's timm default of its day)
    from ..models.weights import hub_repo

    try:
        return hub_repo(weights.get("tag") or card.model["backbone"])
    except UserError:  # timm knows no hub weights for the tag
        return None


def readme_body(card: ModelCard, name: str, results: list[dict]) -> str:
    """What the model is, how it scores, its figures, and how to load it."""
    m, weights = card.model, card.weights or {}
    lines = [f"# {name}", "",
             f"HyperIQA (blind image quality assessment) on a timm `{m['backbone']}` backbone, an iqa-dist model "
             "directory. A score is the mean prediction over "
             f"{card.test_patch_num} {m['img_size']}-px patches ({card.protocol} protocol) of the image, resized as "
             "its training images were.", "", "| dataset | scores on | resize | test protocol |", "|---|---|---|---|"]
    for d, t in card.datasets.items():
        lines.append(f"| {d} | {t.score_range[0]:g}-{t.score_range[1]:g} | {t.resize} | "
                     f"{card.test_patch_num} x {card.protocol} |")
    sha = f" (sha256 `{weights['sha256'][:16]}`...)" if weights.get("sha256") else ""
    if weights.get("source") == "import":
        lines += ["", f"Weights: imported from `{weights['name']}`{sha}: {weights['about']}."]
    else:
        start = weights.get("about") or f"{weights.get('source', 'none')} `{weights.get('tag', m['backbone'])}`"
        lines += ["", f"Weights: step {card.step} of a run that started from {start}{sha}."]
    if card.unknown_training:
        lines += ["", f"Training images: {card.unknown_training}."]
    if results:
        lines += ["", "| dataset | split | SRCC | PLCC | images |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['dataset']} | {r['split']} | {_fmt(r['metrics'].get('srcc'))} | {_fmt(r['metrics'].get('plcc'))} "
                  f"| {r['metrics'].get('n', '')} |" for r in results]
    lines += ["", "## Use", "", "```bash", f"iqa-dist predict {name} photos/ --format csv --output scores.csv",
              f"iqa-dist evaluate --weights {name} --dataset {card.dataset} --root /data/{card.dataset}", "```", "",
              "```python", "import iqa_dist", f'scores = iqa_dist.load_model("{name}").score(["a.jpg", "b.png"])', "```",
              "", "Licence: not set by the export; the owner adds it (`license:` in the header above).", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Uploads `folder` to Hub model repo `repo_id` (created if missing) with huggingface_hub's
    own calls; returns the commit URL. Needs a token (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message="iqa-dist export")
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"--push {repo_id}: the upload failed ({type(e).__name__}: {first_line(e, 200)}); the folder "
                        f"{folder} is complete: push it again, or with `hf upload {repo_id} {folder}`") from None
    return str(info.commit_url)
