"""A run that starts from a trained model's weights (`model.init_from`): fine-tuning a model
folder, a run's selected model, an imported published model or a Hub repo on new data.

The recipe (data, optimizer, schedule, regularisers) is the preset's; the architecture is the
start model's, since its weights are what the run starts from (`with_start_architecture` puts it
in the resolved config, and refuses an override that asks for another). The run records the start
as it records pretrained weights (source "model", the folder or repo id, the file's sha256), and
its model card inherits what the start trained on: the start's training images join the run's in
train_images.json, and a start whose training images are unknown makes the run's unknown too, so
`evaluate` never reports an image either model trained on as held out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

from torch import nn

from ..artifacts.card import WEIGHTS_FILE, ModelCard, model_dir
from ..config import Config, ModelConfig
from ..errors import UserError, first_line
from ..models.weights import sha256


@dataclass
class StartModel:
    given: str  # model.init_from as written: a folder or a Hub repo id
    folder: Path  # its model directory (a Hub repo's local snapshot)
    card: ModelCard

    @classmethod
    def find(cls, given: str) -> "StartModel":
        try:
            folder = model_dir(given)
        except UserError as e:
            raise UserError(f"model.init_from={given!r}: {e}") from None
        return cls(given, folder, ModelCard.read(folder))

    @property
    def hub(self) -> bool:
        return not Path(self.given).exists()  # model_dir resolved it as a Hub repo id

    def architecture(self) -> dict:
        return self.card.model_config().architecture()

    def check(self, model_cfg: ModelConfig) -> None:
        """The run's architecture must be the start's (its weights have those names and shapes)."""
        ours, theirs = model_cfg.architecture(), self.architecture()
        differ = [f"model.{k}={ours[k]!r} (the start model's: {theirs[k]!r})" for k in theirs if ours[k] != theirs[k]]
        if differ:
            raise UserError(f"model.init_from={self.given!r}: the run asks for another architecture than the start "
                            f"model's, whose weights it would load: {'; '.join(differ)}. Leave those settings to the "
                            "start model")

    def load_into(self, model: nn.Module) -> None:
        from safetensors.torch import load_file

        file = self.folder / WEIGHTS_FILE
        try:
            model.load_state_dict(load_file(str(file)))
        except Exception as e:  # safetensors' own error for a cut file, or a key or shape mismatch
            raise UserError(f"model.init_from={self.given!r}: {file} cannot be loaded ({type(e).__name__}: "
                            f"{first_line(e)}); the file is damaged: copy or export it again") from None

    def provenance(self) -> dict:
        """The run's `weights` record (meta.json and model card), as pretrained weights have one."""
        file = self.folder / WEIGHTS_FILE
        start = {"source": "model", "tag": self.card.model["backbone"], "model": self.given, "file": str(file.resolve()),
                 "sha256": sha256(file), "about": f"the trained iqa-dist model {self.given}"}
        return {**start, "repo": self.given.split("@")[0]} if self.hub else start

    def unknown_training(self) -> str:
        """Why the run's training images are not all known: the start's reason, if it has one."""
        why = self.card.unknown_training
        return f"started from {self.given}, whose training images are unknown ({why})" if why else ""

    def train_images(self) -> dict[str, dict[str, list[str]]]:
        return ModelCard.recorded_images(self.folder)


def with_start_architecture(cfg: Config, given: Collection[str]) -> Config:
    """cfg with model.init_from's architecture (and model.pretrained none: every weight comes
    from the start); `given`: the config keys the user set, any of which may not ask for another."""
    start = StartModel.find(cfg.model.init_from)
    theirs = start.architecture()
    clash = [f"--model.{k}={getattr(cfg.model, k)!r}" for k in theirs
             if f"model.{k}" in given and getattr(cfg.model, k) != theirs[k]]
    if clash:
        raise UserError(f"--init-from {cfg.model.init_from}: {', '.join(clash)} asks for another architecture than "
                        f"the start model's ({', '.join(f'{k}={theirs[k]!r}' for k in theirs if f'model.{k}' in given)}), "
                        "whose weights the run starts from: leave it out")
    return replace(cfg, model=replace(cfg.model, **theirs, pretrained="none"))


def merge_images(own: dict[str, dict[str, list[str]]], inherited: dict[str, dict[str, list[str]]]
                 ) -> dict[str, dict[str, list[str]]]:
    """train_images.json of a run that started from a model: its own images and the start's."""
    out = {name: {key: list(values) for key, values in record.items()} for name, record in own.items()}
    for name, record in inherited.items():
        mine = out.setdefault(name, {})
        for key, values in record.items():
            mine[key] = [*mine.get(key, []), *values]
    return out
