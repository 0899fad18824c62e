"""The fixed-effect stage: a global logistic regression trained by TF workers
(``MultiWorkerMirroredStrategy``) to convergence; see ``stage.train``."""
