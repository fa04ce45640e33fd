"""Runs the model's behaviours on one Keras backend (a subprocess of test_backends.py).

Usage: KERAS_BACKEND=torch python backend_check.py write|read|parity FOLDER

`write`: loads FOLDER/reference.keras (written by TensorFlow), checks its
logits, padding, the cached step, the input errors and `fit`, then saves the
trained model as FOLDER/BACKEND.keras with its logits. `read`: loads every
other backend's model and compares with the logits it wrote. `parity` (the
fast tier's twin of `write`): the reference's logits and greedy tokens only. Prints one JSON
object of findings (the test asserts on them).
"""

import json
import os
import sys

import keras
import numpy as np

from algpt2_tf import ALGPT2LMHeadModel  # noqa: F401  (registers the model with Keras)

BACKENDS = ("tensorflow", "torch", "jax")


def logits(model, ids, mask=None):
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    return keras.ops.convert_to_numpy(model(inputs)["logits"])


def error_of(call):
    try:
        call()
    except ValueError as e:
        return str(e)
    return None


def write(folder, found):
    backend = keras.backend.backend()
    reference = np.load(os.path.join(folder, "reference.npz"))
    model = keras.models.load_model(os.path.join(folder, "reference.keras"))
    ids = reference["ids"]
    found["forward_diff"] = float(np.abs(logits(model, ids) - reference["logits"]).max())

    # Left padding does not change the logits of the real tokens.
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids[:1]], axis=1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, ids.shape[1]))], axis=1).astype("int32")
    found["padding_diff"] = float(np.abs(logits(model, padded, mask)[:, 3:]
                                         - logits(model, ids[:1])).max())

    # The cached step (prefill, then one token at a time) equals a full recompute.
    config = model.config
    total = ids.shape[1]
    caches = model.empty_caches(1, total)
    key_mask = np.zeros((1, total), "int32")
    key_mask[:, :4] = 1
    step_logits, caches = model.forward_with_cache(
        ids[:1, :4], np.arange(4)[None], key_mask, caches, 0)
    rows = [keras.ops.convert_to_numpy(step_logits)[0]]
    for t in range(4, total):
        key_mask[:, t] = 1
        step_logits, caches = model.forward_with_cache(
            ids[:1, t:t + 1], np.array([[t]]), key_mask, caches, t)
        rows.append(keras.ops.convert_to_numpy(step_logits)[0])
    cached = np.concatenate(rows, axis=0)
    found["cache_diff"] = float(np.abs(cached - logits(model, ids[:1])[0]).max())

    # Clear errors for bad ids and too-long inputs.
    found["error_large_id"] = error_of(lambda: model({"input_ids": np.array([[config.vocab_size]])}))
    found["error_negative_id"] = error_of(lambda: model({"input_ids": np.array([[-1]])}))
    found["error_too_long"] = error_of(
        lambda: model({"input_ids": np.zeros((1, config.max_positions + 1), "int32")}))

    # Greedy generation (the TF loop there, the eager loop here) from two prompts.
    found["greedy"] = model.generate([[5, 6, 7], [8]], max_new_tokens=6, stop_ids=[]).new_ids
    sampled = [model.generate([[5, 6, 7]], max_new_tokens=6, sampler="top_p", top_p=0.9,
                              seed=3, stop_ids=[]).new_ids for _ in range(2)]
    found["sampling_repeats"] = sampled[0] == sampled[1]

    # fit lowers the loss, with the SOP head trained too.
    keras.utils.set_random_seed(0)
    batch = np.tile(ids, (8, 1))
    data = {"input_ids": batch, "attention_mask": np.ones_like(batch),
            "sop_labels": np.arange(len(batch)) % 2}
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    history = model.fit(data, batch_size=4, epochs=4, verbose=0, shuffle=False).history
    found["lm_loss"] = [float(x) for x in history["lm_loss"]]
    found["sop_loss"] = [float(x) for x in history["sop_loss"]]

    model.save(os.path.join(folder, f"{backend}.keras"))
    np.save(os.path.join(folder, f"{backend}.npy"), logits(model, ids))

    if backend == "torch":  # the model is a torch.nn.Module: a plain PyTorch loop trains it
        import torch

        found["is_torch_module"] = isinstance(model, torch.nn.Module)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = torch.as_tensor(ids, dtype=torch.long)
        found["torch_loop_losses"] = []
        for _ in range(5):
            out = model({"input_ids": batch}, training=True)["logits"]
            loss = torch.nn.functional.cross_entropy(
                out[:, :-1].reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            found["torch_loop_losses"].append(loss.item())

        # fit reads a torch DataLoader, PyTorch's natural input, as it reads tf.data.
        class Rows(torch.utils.data.Dataset):
            def __len__(self):
                return 16

            def __getitem__(self, i):
                row = torch.as_tensor(ids[i % len(ids)], dtype=torch.int32)
                return {"input_ids": row, "attention_mask": torch.ones_like(row),
                        "sop_labels": torch.tensor(i % 2)}

        loader = torch.utils.data.DataLoader(Rows(), batch_size=4)
        history = model.fit(loader, epochs=3, verbose=0).history
        found["dataloader_lm_loss"] = [float(x) for x in history["lm_loss"]]


def parity(folder, found):
    reference = np.load(os.path.join(folder, "reference.npz"))
    model = keras.models.load_model(os.path.join(folder, "reference.keras"))
    found["forward_diff"] = float(np.abs(logits(model, reference["ids"])
                                         - reference["logits"]).max())
    found["greedy"] = model.generate([[5, 6, 7], [8]], max_new_tokens=6, stop_ids=[]).new_ids


def read(folder, found):
    ids = np.load(os.path.join(folder, "reference.npz"))["ids"]
    for writer in BACKENDS:
        if writer == keras.backend.backend():
            continue
        model = keras.models.load_model(os.path.join(folder, f"{writer}.keras"))
        expected = np.load(os.path.join(folder, f"{writer}.npy"))
        found[f"load_{writer}_diff"] = float(np.abs(logits(model, ids) - expected).max())


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    found = {"backend": keras.backend.backend()}
    {"write": write, "read": read, "parity": parity}[mode](folder, found)
    print("RESULT " + json.dumps(found))
