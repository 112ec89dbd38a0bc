"""Every private part of Optuna that EMPAS relies on, checked against the installed Optuna.

If one of these fails after an Optuna upgrade, storage/optuna_adapter.py (the only module that touches
them) must be adapted before EMPAS writes a study with that Optuna."""

import optuna
import pytest

from storage import optuna_adapter as oa


def test_rdb_models_have_the_tables_and_columns_empas_writes():
    m = oa.rdb_models()
    expected = {
        "StudyModel": {"study_id", "study_name"},
        "StudyDirectionModel": {"study_id", "objective", "direction"},
        "StudyUserAttributeModel": {"study_id", "key", "value_json"},
        "StudySystemAttributeModel": {"study_id", "key", "value_json"},
        "TrialModel": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
        "TrialValueModel": {"trial_id", "objective", "value", "value_type"},
        "TrialParamModel": {"trial_id", "param_name", "param_value", "distribution_json"},
        "TrialUserAttributeModel": {"trial_id", "key", "value_json"},
        "TrialSystemAttributeModel": {"trial_id", "key", "value_json"},
        "TrialIntermediateValueModel": {"trial_id", "step", "intermediate_value", "intermediate_value_type"},
    }
    for model, columns in expected.items():
        table = getattr(m, model).__table__
        assert columns <= set(table.c.keys()), f"{model} lost a column EMPAS writes"


@pytest.mark.parametrize("value", [1.5, -2.0, float("inf"), float("-inf")])
def test_value_encoders_round_trip(value):
    stored, kind = oa.value_to_stored(value)
    assert oa.stored_to_value(stored, kind) == value


def test_nsga_keys_are_what_the_sampler_reads():
    assert oa.nsga_keys() == oa.EXPECTED_NSGA_KEYS
    # and the sampler really reads a trial's generation under that key
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=2, seed=0))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    assert [t.system_attrs[oa.nsga_keys()[0]] for t in study.trials] == [0, 0, 1]


def test_in_memory_study_internals_and_cheap_trial_copies():
    study = optuna.create_study(directions=["minimize", "minimize"])
    storage, study_id = oa.study_storage(study)
    assert storage.get_study_directions(study_id) == [optuna.study.StudyDirection.MINIMIZE] * 2
    trial = oa.window_trial_class()(number=0, state=optuna.trial.TrialState.COMPLETE, value=None, values=[1.0, 2.0],
                                    datetime_start=None, datetime_complete=None,
                                    params={"g": "q4_k"}, distributions={
                                        "g": optuna.distributions.CategoricalDistribution(["q4_k", "f16"])},
                                    user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1)
    tid = storage.create_new_trial(study_id, template_trial=trial)
    frozen = storage.get_trial(tid)
    assert oa.trial_id(frozen) == tid and frozen.params == {"g": "q4_k"}
    (summary,) = [s for s in storage.get_all_studies() if s.study_name == study.study_name]
    assert oa.frozen_study_id(summary) == study_id


def test_hypervolume_is_there_and_right():
    import numpy as np

    hv = oa.compute_hypervolume()
    assert hv is not None, "optuna._hypervolume.compute_hypervolume is gone: search/hypervolume.py falls back"
    assert hv(np.array([[0.5, 0.5]]), np.array([1.0, 1.0])) == pytest.approx(0.25)
