"""Train the two text-task models (BERT encoder, Llama decoder) and ship their weights with
their test accuracies; ``--quick`` runs a few steps and writes nothing."""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.text_task import (
    NAMES,
    WEIGHTS,
    accuracy,
    build_text_model,
    make_sequences,
    weights_path,
)

TRAIN_SEED, TEST_SEED = 0, 1


def train(name: str, steps: int, batch: int = 128, lr: float = 3e-3) -> tuple[object, float]:
    """The trained model and its accuracy on 2000 held-out sequences."""
    torch.manual_seed(0)
    model = build_text_model(name)
    ids, labels, _ = make_sequences(steps * batch, TRAIN_SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[part]).logits, labels[part])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test_ids, test_labels, _ = make_sequences(2000, TEST_SEED)
    return model, accuracy(model, test_ids, test_labels)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps, nothing written")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    steps = 3 if args.quick else args.steps
    results = {}
    for name in NAMES:
        start = time.perf_counter()
        model, acc = train(name, steps)
        results[name] = acc
        seconds = time.perf_counter() - start
        print(f"{name}: accuracy {acc:.4f} after {steps} steps, {seconds:.1f} s")
        if not args.quick:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(weights_path(name)))
    if not args.quick:
        path = WEIGHTS / "text_metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics.update({f"text_{k}": v for k, v in results.items()})
        path.write_text(json.dumps(metrics, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
