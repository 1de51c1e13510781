"""The progress line of a stage: counted by Ray Data's rows, by the job, or not at all."""

from segray.report import Stage


def test_a_stage_follows_ray_data_rows_by_default():
    s = Stage("infer", every=60)
    s.dataset_progress("ds1", 120, 300)
    assert s.line().startswith("infer: 120/300 rows")


def test_a_multi_phase_stage_is_not_counted_by_the_last_dataset():
    # The demo (data, training, inference): a Dataset of 12 rows must not make it "0/12 rows".
    s = Stage("demo", every=60, follow_datasets=False)
    s.dataset_progress("ds1", 0, 12)
    assert s.line().startswith("demo: running") and "/12" not in s.line()
    assert s.line(final=True).startswith("demo: done in") and "rows" not in s.line(final=True)


def test_a_job_that_counts_itself_ignores_ray_data():
    s = Stage("scenes", total=4, unit="scenes", every=60)
    s.dataset_progress("ds1", 900, 1000)
    s.advance(1)
    assert s.line().startswith("scenes: 1/4 scenes")
