"""lm-evaluation-harness runs a loglikelihood (multiple-choice) task against a live server, end to end.

The harness tokenizes through the server (`/tokenizer_info`, `/tokenize`), sends token prompts with
`echo`, `logprobs` and `max_tokens: 1`, and sums the continuation's prompt logprobs. Its per-choice
loglikelihoods are checked against transformers on the same tokens, and its accuracy against the
choices those reference loglikelihoods pick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inferflux.formats.tokenizer import Tokenizer

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud", "seven"], 0),
    ("Two plus two equals", ["four", "a river", "purple"], 0),
    ("A llama is an", ["animal", "engine", "opinion", "idea"], 0),
    ("Water freezes when it is", ["cold", "hot", "angry"], 0),
    ("The opposite of up is", ["down", "sideways", "banana"], 0),
    ("Fish live in", ["water", "trees", "clouds", "books"], 0),
]

TASK = """task: inferflux_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_multiple_choice_against_live_server(server, tiny_model, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "inferflux_tiny_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=remote,num_concurrent=1,"
            "max_retries=1,timeout=120",
            "--tasks", "inferflux_tiny_mc", "--include_path", str(tasks), "--output_path", str(out),
            "--log_samples", "--seed", "0"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["inferflux_tiny_mc"]
    samples = [json.loads(line) for line in next(out.rglob("samples_inferflux_tiny_mc_*.jsonl")).read_text()
               .splitlines()]
    assert len(samples) == len(QUESTIONS)

    # The reference: transformers on the tokens the harness sent (our tokenizer, as /tokenize gives them).
    folder = tiny_model("llama")
    tokenizer = Tokenizer.from_hf_dir(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        ctx = tokenizer.encode(context, add_special_tokens=False)
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        return float(sum(logprobs[p - 1, whole[p]] for p in range(len(ctx), len(whole))))

    correct = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        got = [float(resp[0][0]) for resp in sample["resps"]]  # the log stores them as strings
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
        want = [loglikelihood(arg["arg_0"], arg["arg_1"]) for arg in arguments]
        assert got == pytest.approx(want, abs=2e-3)
        correct.append(int(np.argmax(want)) == int(sample["target"]))
    assert results["acc,none"] == pytest.approx(float(np.mean(correct)))
