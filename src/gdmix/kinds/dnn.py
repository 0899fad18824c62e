"""Kind ``dnn``: a deep fixed effect (dense layers over the global bag, an optional text
tower), trained with AdamW under ``MultiWorkerMirroredStrategy`` (``gdmix.deep``)."""
from __future__ import annotations

from gdmix.config import FIXED_EFFECT
from gdmix.deep import scoring, settings, text
from gdmix.fixed_effect import stage
from gdmix.kinds.base import Kind, Partitioning, TrainContext


class Dnn(Kind):
    name = "dnn"
    type = FIXED_EFFECT
    selector = ("dnn",)
    tf_workers = True
    convex = False  # a neural network: its steps may raise the reported objective

    def validate(self, cfg, coord, path):
        settings.parse(coord.dnn, f"{path}.dnn")

    def prepared_columns(self, cfg, coord, workdir, train_df):
        """The text tower's token ids, with a vocabulary built from the train rows only."""
        st = settings.of(cfg, coord)
        if not st.text:
            return []
        words = text.build_vocab(train_df, st.text, st.vocab_min_count, st.vocab_max_size)
        text.save_vocab(text.vocab_url(workdir, coord.name), st.text, words)
        return [(text.tokens_column(st.text), text.token_ids(st.text, words))]

    def partitioning(self, coord):
        return Partitioning(by="uid", shards=coord.workers, entity_column=False, prepared_first=True)

    def train(self, cfg, workdir, step, ctx: TrainContext) -> dict:
        return stage.train(cfg, workdir, step, launcher=ctx.launcher, command=stage.DNN_WORKER_COMMAND)

    def export(self, cfg, workdir, coord, step) -> str:
        return scoring.export(workdir, step.iteration, step.coordinate, coord.name)

    def score_frame(self, spark, cfg, coord, workdir, raw):
        return scoring.score_frame(spark, cfg, coord, workdir, raw, cfg.data.columns.uid)

    def in_memory_scorer(self, cfg, coord, models_url):
        return scoring.in_memory_scorer(cfg, coord, models_url)


KIND = Dnn()
