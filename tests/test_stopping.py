
import dataclasses

from charlm.stopping import Patience
from charlm.tracking import NullTracker
from charlm.trainer import train


def run(curve, patience, mri, interval=100):
    p = Patience(patience, mri)
    for i, loss in enumerate(curve, start=1):
        if p.update(i * interval, loss):
            return p
    return p


CURVE = [3.0, 2.5, 2.4, 2.45, 2.41, 2.39, 2.5, 2.6, 2.7, 2.8]


def test_stops_after_patience_misses():
    p = run(CURVE, patience=3, mri=0.0)
    # 2.39 at step 600 resets the count; 700, 800, 900 miss -> stop at 900
    assert p.stopped_at == 900 and p.best == 2.39 and p.best_step == 600


def test_min_relative_improvement_is_relative_to_last_improvement():
    p = run(CURVE, patience=3, mri=0.05)
    # 3.0 -> 2.5 improves by 17%; 2.4 (4%), 2.45, 2.41 do not beat 2.5 * 0.95 -> stop at 500
    assert p.stopped_at == 500
    assert p.best == 2.4 and p.best_step == 300  # the weights kept are still the lowest loss


def test_gains_accumulate_from_the_last_improvement():
    # each evaluation gains 1.5% on the one before, under the 2% required: measured from the last
    # improvement, two evaluations add up to enough, so patience 2 never fires and patience 1 does
    curve = [0.985 ** i for i in range(10)]
    assert run(curve, patience=2, mri=0.02).stopped_at is None
    assert run(curve, patience=1, mri=0.02).stopped_at == 200


def test_zero_patience_never_stops_and_nan_is_a_miss():
    assert run(CURVE, patience=0, mri=0.0).stopped_at is None
    assert run([2.0, float("nan"), float("nan")], patience=2, mri=0.0).stopped_at == 300


def test_reference_from_peers():
    p = Patience(2, 0.0)
    assert p.update(100, 2.0, reference=1.9) is False  # behind the peers: one miss
    assert p.update(200, 1.8, reference=1.85) is False  # caught up: reset
    assert p.update(300, 1.9, reference=1.7) is False
    assert p.update(400, 1.8, reference=1.6) is True


def test_trainer_stops_exactly_where_the_rule_says(tiny_cfg):
    # With a 50% required gain only the first evaluation can improve, so the rule predicts a stop
    # at 1 + patience evaluations; the trainer's logged curve must replay to the same step.
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, patience=2, min_relative_improvement=0.5, validation_interval=10, max_steps=100))
    res = train(cfg, NullTracker())
    assert res.stop_reason == "early_stop"
    assert res.early_stop_step == res.steps == 30
    replay = run([h["val_loss"] for h in res.history], patience=2, mri=0.5, interval=10)
    assert replay.stopped_at == res.early_stop_step
    # the best weights were restored: the checkpoint's step is the best evaluation's step
    assert res.best_step == min(res.history, key=lambda h: h["val_loss"])["step"]
