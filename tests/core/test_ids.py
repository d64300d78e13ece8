import time

from core.ids import looks_like, new_id


def test_ids_are_prefixed_and_well_formed():
    value = new_id("job")
    assert value.startswith("job_") and len(value) == 4 + 26
    assert looks_like(value, "job") and not looks_like(value, "req")
    assert not looks_like("job_../../etc", "job")


def test_ids_sort_by_creation_time_and_do_not_repeat():
    first = new_id("req")
    time.sleep(0.002)
    later = [new_id("req") for _ in range(2000)]
    assert all(first < x for x in later)
    assert len(set(later)) == len(later)
