"""One training worker of a deep fixed effect (an embedded subprocess or a TFJob replica).

    python -m gdmix.deep.worker --workdir W --iteration k --coordinate c

Started by the fixed-effect launcher with ``TF_CONFIG`` and the same exit protocol as the
linear worker (final barrier, status file, wait for peers, ``os._exit``).

Mini-batches do not depend on the number of workers: each epoch, a permutation seeded by
(seed, epoch) over all train uids (gathered once) puts every row in one global batch;
each worker feeds its own rows of that batch (maybe none), scaled by 1 / the batch's
total weight, and the optimizer's all-reduce sums the workers' gradients. One worker and
two therefore take the same steps, up to float32 summation order in the all-reduce.
After each epoch every worker scores its validation rows, the scores are gathered, and
all compute the same exact AUC (of offset + logit): the best epoch's weights are kept (the
start, warm or cold, is epoch 0) and training stops after ``patience`` epochs without
improvement.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from gdmix import auc, config, layout, losses, plan, schema, storage
from gdmix.deep import model as dmodel, saved, settings as dsettings, text
from gdmix.fixed_effect import data
from gdmix.fixed_effect.solver import SolveInfo
from gdmix.fixed_effect.worker import (all_sum_function, cluster_role, cluster_strategy, status_url, tf_loss,
                                       wait_for_peers)


class Split:
    """One worker's rows of a split as model inputs."""

    def __init__(self, workdir, iteration, coordinate, split, index, n_workers, d, st: dsettings.DnnSettings):
        shard = data.worker_rows(workdir, iteration, coordinate, split, index, n_workers, d)
        self.uid, self.y, self.w, self.o = shard.uid, shard.y, shard.w, shard.offset
        self.bag = dmodel.dense_bag(shard.x, d)
        self.tokens = read_tokens(workdir, split, self.uid, st) if st.text else None

    @property
    def n(self) -> int:
        return len(self.uid)

    def inputs(self, rows=None) -> list:
        arrays = dmodel.inputs(self.bag, self.tokens)
        return arrays if rows is None else [a[rows] for a in arrays]


def read_tokens(workdir: str, split: str, uids: np.ndarray, st: dsettings.DnnSettings) -> np.ndarray:
    """The rows' token ids from the prepared split (the partition carries only the bag)."""
    column = text.tokens_column(st.text)
    t = storage.read_table(layout.prepared(workdir, split), columns=[schema.UID, column])
    all_uid = t.column(schema.UID).to_numpy()
    order = np.argsort(all_uid, kind="stable")
    pos = np.searchsorted(all_uid[order], uids)
    pos = np.minimum(pos, len(order) - 1)
    if len(uids) and not np.array_equal(all_uid[order][pos], uids):
        raise ValueError(f"{layout.prepared(workdir, split)}: rows of the partition have no {column}")
    lists = t.column(column).to_pylist()
    return dmodel.padded_tokens([lists[i] for i in order[pos]], st.text_max_tokens)


class Collective:
    """Sums over the workers (float64), as the linear worker's all-reduce."""

    def __init__(self, strategy, index: int, n_workers: int):
        self.index, self.n_workers = index, n_workers
        self.sum = all_sum_function(strategy)

    def gather(self, local: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Every worker's ``local`` vector, concatenated in worker order."""
        start = int(counts[:self.index].sum())
        full = np.zeros(int(counts.sum()))
        full[start:start + len(local)] = local
        return self.sum(full)

    def counts(self, n: int) -> np.ndarray:
        one = np.zeros(self.n_workers)
        one[self.index] = n
        return np.rint(self.sum(one)).astype(np.int64)


def epoch_batches(global_uid_sorted: np.ndarray, global_w_sorted: np.ndarray, local_uid: np.ndarray,
                  seed: int, epoch: int, batch_size: int):
    """This worker's rows per global batch of an epoch, and each batch's total weight."""
    n = len(global_uid_sorted)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.arange(n)  # sorted-uid k sits at position rank[k] of the epoch
    batch_weight = np.bincount(rank // batch_size, weights=global_w_sorted, minlength=-(-n // batch_size))
    local_rank = rank[np.searchsorted(global_uid_sorted, local_uid)]
    order = np.argsort(local_rank, kind="stable")
    bounds = np.searchsorted(local_rank[order], np.arange(len(batch_weight) + 1) * batch_size)
    return [order[bounds[b]:bounds[b + 1]] for b in range(len(batch_weight))], batch_weight


def build_trainer(strategy, net, optimizer, st: dsettings.DnnSettings, d: int, task: str = "logistic"):
    import tensorflow as tf

    specs = [tf.TensorSpec([None, d], tf.float32)]
    if st.text:
        specs.append(tf.TensorSpec([None, st.text_max_tokens], tf.int32))
    specs += [tf.TensorSpec([None], tf.float32)] * 3 + [tf.TensorSpec([], tf.float32)]

    def replica_fn(*args):
        *x, y, w, o, scale = args
        with tf.GradientTape() as tape:
            s = o + net(list(x), training=True)[:, 0]
            # Σ w ℓ(s, y) / (the global batch's weight): the workers' parts sum to the mean
            # (the task's loss: logistic, squared error or Poisson; ``tf_loss``).
            loss = tf_loss(tf, s, y, w, task) * scale
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))  # all-reduces the gradients
        return loss

    @tf.function(input_signature=specs)
    def step(*args):
        return strategy.run(replica_fn, args=args)

    return step


def train(workdir: str, iteration: int, coordinate: str) -> dict:
    index, n_workers = cluster_role()
    chief = index == 0
    started = time.time()
    cfg = config.load_run(workdir)
    coord = cfg.coordinate(coordinate)
    if not (coord.is_fixed_effect and coord.model == "dnn"):
        raise ValueError(f"coordinate {coordinate!r} is not a dnn fixed effect")
    st = dsettings.of(cfg, coord)
    step = plan.Step(iteration, coordinate)
    d = data.n_features(workdir, coord.feature_bag)
    if d > dsettings.MAX_DENSE_FEATURES:
        raise ValueError(f"feature bag {coord.feature_bag!r} has {d} features; the dnn model densifies "
                         f"the bag and takes at most {dsettings.MAX_DENSE_FEATURES}")
    words = text.load_vocab(text.vocab_url(workdir, coordinate))["words"] if st.text else None
    tr = Split(workdir, iteration, coordinate, "train", index, n_workers, d, st)
    va = Split(workdir, iteration, coordinate, "validation", index, n_workers, d, st)
    prev = plan.latest(cfg, coordinate, step)
    warm_url = saved.step_model_dir(workdir, prev.iteration, prev.coordinate) if prev else None
    if warm_url and not storage.exists(storage.join(warm_url, saved.MODEL_FILE)):
        raise FileNotFoundError(f"{warm_url}: no saved model of {prev} to warm-start from")

    import keras
    import tensorflow as tf

    tf.keras.utils.set_random_seed(st.seed)
    tf.config.experimental.enable_op_determinism()
    strategy = cluster_strategy(tf)
    coll = Collective(strategy, index, n_workers)
    # Loaded only now: Keras touching TF before the strategy exists breaks collectives' set-up.
    warm = saved.load(warm_url)[0] if warm_url else None
    vocab = len(words) + 2 if words is not None else None
    with strategy.scope():
        net = dmodel.build(d, st, vocab)
        optimizer = keras.optimizers.AdamW(learning_rate=st.learning_rate, weight_decay=st.weight_decay)
    if warm is not None:
        net.set_weights(warm.get_weights())

    train_counts, val_counts = coll.counts(tr.n), coll.counts(va.n)
    if int(train_counts.sum()) == 0:
        raise ValueError(f"{step}: no train rows")
    g_uid = np.rint(coll.gather(tr.uid.astype(np.float64), train_counts)).astype(np.int64)
    g_w = coll.gather(tr.w, train_counts)
    by_uid = np.argsort(g_uid, kind="stable")
    g_uid, g_w = g_uid[by_uid], g_w[by_uid]
    val_y, val_w = coll.gather(va.y, val_counts), coll.gather(va.w, val_counts)

    task_loss = losses.of(cfg.task)
    figure = "validation AUC" if cfg.task == "logistic" else "validation -mean loss"

    def val_auc() -> float:
        """Early stopping's figure, higher is better: the validation AUC (logistic), else
        minus the mean validation loss Σ w ℓ / Σ w (squared error or Poisson)."""
        s = va.o + saved.predict(net, va.inputs())
        if not val_y.size:
            return float("nan")
        s = coll.gather(s, val_counts)
        if cfg.task == "logistic":
            return auc.auc_reference(s, val_y, val_w)
        return -task_loss.loss(s, val_y, val_w) / max(float(val_w.sum()), 1e-300)

    ckpt = tf.train.Checkpoint(model=net, optimizer=optimizer)
    # Only the chief's checkpoint is kept; the others write theirs to a private folder.
    ckpt_dir = saved.checkpoint_dir(workdir, iteration, coordinate) if chief else tempfile.mkdtemp(prefix="gdmix-ckpt-")
    ckpt_prefix = os.path.join(storage.absolute(ckpt_dir) if storage.is_local(ckpt_dir) else ckpt_dir, "best")
    trainer = build_trainer(strategy, net, optimizer, st, d, cfg.task)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    best_auc, best_epoch, best = val_auc(), 0, net.get_weights()
    history = [{"epoch": 0, "validation_auc": best_auc}]
    epoch, since = 0, 0
    if chief:
        print(f"[deep {step}] {n_workers} worker(s), {int(train_counts.sum())} rows, {d} features"
              f"{f', text {st.text} ({vocab} tokens)' if st.text else ''}, "
              f"{'warm' if warm is not None else 'cold'} start, {figure} {best_auc:.5f}", flush=True)
    for epoch in range(1, st.epochs + 1):
        batches, batch_weight = epoch_batches(g_uid, g_w, tr.uid, st.seed, epoch, st.batch_size)
        for rows, bw in zip(batches, batch_weight):
            trainer(*[a for a in tr.inputs(rows)], f32(tr.y[rows]), f32(tr.w[rows]), f32(tr.o[rows]),
                    np.float32(1.0 / bw if bw > 0 else 0.0))
        a = val_auc()
        history.append({"epoch": epoch, "validation_auc": a})
        if chief:
            print(f"[deep {step}] epoch {epoch} {figure} {a:.5f}", flush=True)
        if a > best_auc:
            best_auc, best_epoch, best, since = a, epoch, net.get_weights(), 0
            ckpt.write(ckpt_prefix)
        else:
            since += 1
            if since >= st.patience:
                break
    net.set_weights(best)

    # Scores and the saved model come from a plain (non-distributed) copy, so scoring the
    # saved model later computes exactly these numbers.
    plain = dmodel.build(d, st, vocab)
    plain.set_weights(best)
    rows = {}
    loss = 0.0
    for split, part in (("train", tr), ("validation", va)):
        f = saved.predict(plain, part.inputs())
        if split == "train":
            s = part.o + f
            loss = task_loss.loss(s, part.y, part.w)
        rows[split] = part.n
        storage.write_table(storage.join(layout.scores(workdir, iteration, coordinate, coordinate, split),
                               f"part-{index:05d}.parquet"),
                       pa.Table.from_arrays([pa.array(part.uid, pa.int64()), pa.array(f, pa.float64())],
                                            schema=schema.SCORES))
    total_loss = float(coll.sum([loss])[0])
    if chief:
        saved.save(plain, saved.step_model_dir(workdir, iteration, coordinate), d, st, words)
        # No coefficients: the metrics stage reads none for its penalty (the deep model's
        # regularisation is AdamW's weight decay, outside the reported objective).
        storage.write_table(storage.join(layout.coefficients(workdir, iteration, coordinate, coordinate), "part-00000.parquet"),
                       schema.COEFFICIENTS.empty_table())
        print(f"[deep {step}] done: best epoch {best_epoch}, {figure} {best_auc:.5f}, "
              f"train loss {total_loss:.6g}", flush=True)
    coll.sum([1.0])  # final barrier
    # The same solve record as the linear worker's: epochs as iterations, no Newton terms.
    info = SolveInfo(objective=total_loss, iterations=epoch, evaluations=len(history), hessp_calls=0, hess_calls=0,
                     polish_steps=0, grad_inf=0.0, converged=since >= st.patience, method="AdamW",
                     message=f"best {figure} {best_auc:.5f} at epoch {best_epoch} of {epoch}")
    status = {"worker": index, "workers": n_workers, "rows": rows, "total_rows": int(train_counts.sum()),
              **info.as_dict(), "best_epoch": best_epoch, "validation_auc": best_auc, "history": history,
              "seconds": round(time.time() - started, 3)}
    storage.write_json(status_url(workdir, iteration, coordinate, index), status)
    wait_for_peers(workdir, iteration, coordinate, n_workers, cfg.timeouts.worker_exit_seconds)
    return status


def main(argv=None) -> None:
    from gdmix.fixed_effect.worker import run_main

    run_main("python -m gdmix.deep.worker", train, argv)


if __name__ == "__main__":
    main()
