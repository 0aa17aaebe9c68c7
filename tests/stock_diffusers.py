"""A process with stock diffusers only, started once per test session, that loads (and samples) exported
pipelines the way a user of the export does: `DiffusionPipeline.from_pretrained`, sadm_finetune never imported.

Run as a script it serves requests, one JSON line each on stdin ({"path": ..., "class_labels": [...] or null,
"prompts": [...] or null, "lora": a LoRA folder or null, "lora_weight_names": [...] or null}), answering one JSON
line each on stdout.
`StockDiffusers` is the test side (conftest.py fixture `stock_diffusers`).
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path


def _serve() -> None:
    import traceback

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    answers, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints cannot break the JSON lines
    for line in sys.stdin:
        request = json.loads(line)
        try:
            pipe = DiffusionPipeline.from_pretrained(request["path"])
            answer = {"cls": type(pipe).__name__, "labels": getattr(pipe, "labels", None)}
            pipe.set_progress_bar_config(disable=True)
            if request.get("class_labels") is not None:
                conditions = {"class_labels": request["class_labels"]}
            elif request.get("prompts") is not None:
                conditions = {"prompt": request["prompts"]}
            else:
                conditions = None
            if conditions is not None:
                images = pipe(**conditions, num_inference_steps=2, generator=torch.manual_seed(0),
                              output_type="np").images
                answer.update(shape=list(images.shape), finite=bool(np.isfinite(images).all()))
                if request.get("lora") is not None and not request.get("lora_weight_names"):
                    pipe.load_lora_weights(request["lora"])
                    with_lora = pipe(**conditions, num_inference_steps=2, generator=torch.manual_seed(0),
                                     output_type="np").images
                    answer["lora_change"] = float(np.abs(with_lora - images).max())
                    pipe.unload_lora_weights()
                for name in request.get("lora_weight_names") or []:  # each file of the folder alone on the base
                    pipe.load_lora_weights(request["lora"], weight_name=name)
                    answer.setdefault("lora_images", {})[name] = pipe(
                        **conditions, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
                    ).images.tolist()
                    pipe.unload_lora_weights()
        except Exception:  # noqa: BLE001 - the test shows it
            answer = {"error": traceback.format_exc()}
        answer["sadm_finetune_imported"] = "sadm_finetune" in sys.modules
        print(json.dumps(answer), file=answers, flush=True)


class StockDiffusers:
    """Client of one `_serve` process (env: the offline test environment)."""

    def __init__(self, env: dict[str, str], timeout: float = 300) -> None:
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def load(self, path: str | Path, class_labels: list[int] | None = None, prompts: list[str] | None = None,
             lora: str | Path | None = None, lora_weight_names: list[str] | None = None) -> dict:
        """What the stock process saw: class name, labels, sadm_finetune_imported, and with `class_labels` or
        `prompts` the sampled images' shape and finiteness; with `lora` too, `lora_change`: the largest pixel
        change once `pipe.load_lora_weights(lora)` is applied, or with `lora_weight_names`, `lora_images`: for
        each file name, the images (nested lists) sampled with `pipe.load_lora_weights(lora, weight_name=name)`
        alone; or {"error": traceback}."""
        request = {"path": str(path), "class_labels": class_labels, "prompts": prompts,
                   "lora": None if lora is None else str(lora), "lora_weight_names": lora_weight_names}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            if not selector.select(self.timeout):
                raise TimeoutError(f"stock diffusers process: no answer for {path} in {self.timeout} s")
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"stock diffusers process exited:\n{self._stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.kill()  # nothing left to answer; its interpreter shutdown would only cost time
        self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


if __name__ == "__main__":
    _serve()
