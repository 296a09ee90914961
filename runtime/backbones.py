"""The exported backbones of a workspace, loaded once per runtime and never by a swap."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mmcl_edge.preprocess import PreprocessSpec, preprocess_batch
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.runtime.pack import sha256_file

INDEX_FILE = "backbones.json"


class BackboneSet:
    """One session (ONNX Runtime, or a TensorRT engine when one exists and tensorrt imports) per modality."""

    def __init__(self, folder: Path, providers: list[str], threads: int = 0, use_tensorrt_engine: bool = True):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise RuntimeUserError(f"no exported backbones in {self.folder}; run 'mmcl-edge export' "
                                   "(or learn a task) first")
        self.index = json.loads(index_path.read_text())["modalities"]
        self.specs = {m: self._spec(m, e) for m, e in self.index.items()}
        self.backends: dict[str, str] = {}
        self._runners = {}
        for m, e in self.index.items():
            path = self.folder / e["file"]
            if not path.is_file() or sha256_file(path) != e["sha256"]:
                raise RuntimeUserError(f"backbone {path} is missing or does not match its sha256 "
                                       "in backbones.json; re-export with 'mmcl-edge export --force'")
            engine = self.folder / e.get("tensorrt", {}).get("file", "\0")
            runner = None
            if use_tensorrt_engine and e.get("tensorrt") and engine.is_file():
                from mmcl_edge.runtime.tensorrt_backend import TensorRTEngine, tensorrt_available

                if tensorrt_available()[0]:
                    runner, self.backends[m] = TensorRTEngine(engine, [t["name"] for t in e["taps"]]), "tensorrt-engine"
            if runner is None:
                sess = prov.session(path, providers, threads)
                runner = _OrtRunner(sess, e["input"], [t["name"] for t in e["taps"]])
                self.backends[m] = "onnxruntime:" + sess.get_providers()[0]
            self._runners[m] = runner

    def _spec(self, modality: str, entry: dict) -> PreprocessSpec:
        """The exported preprocessing; a text modality tokenises with the tokenizer exported beside its
        backbone (checked against its sha256), the very file the learner used."""
        spec = PreprocessSpec.from_dict(entry["preprocess"])
        if spec.kind != "text" or spec.encoding != "tokens":
            return spec
        tok = entry.get("tokenizer") or {}
        path = self.folder / tok.get("file", "\0")
        if not path.is_file() or sha256_file(path) != tok.get("sha256"):
            raise RuntimeUserError(f"the tokenizer of the text modality {modality!r} ({path}) is missing or does not "
                                   "match its sha256 in backbones.json; re-export with 'mmcl-edge export --force'")
        return dataclasses.replace(spec, options={**spec.options, "tokenizer_file": str(path)})

    @property
    def modalities(self) -> list[str]:
        return list(self.index)

    def preprocess(self, modality: str, samples) -> np.ndarray:
        return preprocess_batch(samples, self.specs[modality])

    def absent(self, modality: str, batch: int) -> dict[str, np.ndarray]:
        """What an absent modality feeds the pack: zero taps (the learner trains with the same)."""
        return {f"{modality}__{t['name']}": np.zeros((batch, t["tokens"], t["dim"]), np.float32)
                for t in self.index[modality]["taps"]}

    def run(self, modality: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed batch -> ``{"<modality>__<tap>": [B, tokens, dim]}``."""
        outs = self._runners[modality](batch)
        return {f"{modality}__{t['name']}": o for t, o in zip(self.index[modality]["taps"], outs)}


class _OrtRunner:
    def __init__(self, session, input_name: str, outputs: list[str]):
        self.session, self.input_name, self.outputs = session, input_name, outputs

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
