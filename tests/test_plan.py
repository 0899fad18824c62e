from gdmix import plan
from gdmix.plan import Step
from helpers import make_config


def test_order_and_writers(tmp_path):
    cfg = make_config(tmp_path, iterations=2, acceleration="none")  # plain block descent
    steps = plan.steps(cfg)
    assert steps == [Step(0, "global"), Step(0, "per-user"), Step(1, "global"), Step(1, "per-user")]
    # the random-effect step moves mass into the already-trained fixed effect
    assert plan.writes(cfg, Step(0, "per-user")) == ("per-user", "global")
    assert plan.writes(cfg, Step(0, "global")) == ("global",)
    assert plan.latest(cfg, "global", Step(1, "global")) == Step(0, "per-user")
    assert plan.latest(cfg, "per-user", Step(0, "per-user")) is None
    assert plan.state(cfg, Step(1, "per-user")) == {"global": Step(1, "global"), "per-user": Step(0, "per-user")}
    assert plan.state(cfg, None) == {"global": Step(1, "per-user"), "per-user": Step(1, "per-user")}


def test_random_effect_first_does_not_shift(tmp_path):
    from helpers import raw_config
    from gdmix import config

    raw = raw_config(tmp_path)
    raw["coordinates"].reverse()
    cfg = config.parse(raw)
    assert plan.writes(cfg, Step(0, "per-user")) == ("per-user",)
    assert plan.writes(cfg, Step(1, "per-user")) == ("per-user", "global")


def test_the_joint_step_ends_each_pass_and_writes_both_coordinates(tmp_path):
    cfg = make_config(tmp_path, iterations=2)  # acceleration: newton, the default
    assert plan.steps(cfg) == [Step(0, "global"), Step(0, "per-user"), Step(1, "global"), Step(1, "per-user")]
    assert plan.sequence(cfg) == [Step(0, "global"), Step(0, "per-user"), Step(0, "_joint"),
                                  Step(1, "global"), Step(1, "per-user"), Step(1, "_joint")]
    assert plan.writes(cfg, Step(0, "_joint")) == ("global", "per-user")
    assert plan.latest(cfg, "per-user", Step(1, "per-user")) == Step(0, "_joint")
    assert plan.state(cfg, Step(1, "per-user")) == {"global": Step(1, "global"), "per-user": Step(0, "_joint")}
    assert plan.state(cfg, None) == {"global": Step(1, "_joint"), "per-user": Step(1, "_joint")}
