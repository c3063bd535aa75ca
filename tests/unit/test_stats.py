"""--mode stats in user space, without BPF: `Aggregates` folding cumulative readings of the
kernel's aggregates into labelled series, and `Exporter.collect()` turning them into Prometheus
metric families. The readings are synthetic numpy arrays of records.h's stats dtypes."""

from __future__ import annotations

import copy
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from uffdtrace.events import BlockedFault
from uffdtrace.exporter import Exporter
from uffdtrace.probes.records import (
    FAULT_STATS,
    FAULT_STATS_KEY,
    IOCTL_STATS,
    IOCTL_STATS_KEY,
    NR_API,
    NR_CONTINUE,
    NR_COPY,
    ROLE_DISCOVERED,
    ROLE_HANDLER,
    ROLE_TARGET,
    STATS_BUCKETS,
    STATS_KINDS,
    UFFDIO_NAMES,
)
from uffdtrace.stats import (
    BUCKET_BOUNDS_S,
    DEFAULT_LABELS,
    FAULT_LABELS,
    HISTOGRAMS,
    OVERFLOW,
    Aggregates,
    StatsFeed,
)

# The fake classifier's answers are coded in the key's path: path[0] the backing, path[1] the kind.
BACKINGS = (None, "anon", "shmem", "hugetlb")
CLASSIFIED = (None, "missing", "wp", "minor")
KIND_CODE = {name: code for code, name in STATS_KINDS.items()}
COMMS = {100: "app", 200: "qemu", 300: "db"}
STALL, WAKE_TO_RUN, NOTIFY, HANDLER = (HISTOGRAMS.index(h) for h in
                                       ("stall", "wake_to_run", "notify", "handler"))


def describe(keys: np.ndarray) -> tuple[list[str | None], list[str | None]]:
    return ([BACKINGS[int(k["path"][0])] for k in keys], [CLASSIFIED[int(k["path"][1])] for k in keys])


def fault(pid: int = 100, *, tid: int = 0, backing: str = "anon", classified: str | None = None,
          kind: int = 0, extra: int = 0, faults: int = 0, stall_ns: int = 0, comm: bytes = b"app",
          **hists: dict[int, int]) -> dict:
    """One fault aggregate: its key (`extra`: another kernel path of the same backing and kind)
    and its cumulative value (hists: histogram name -> {bucket: count})."""
    assert set(hists) <= set(HISTOGRAMS)
    return dict(pid=pid, tid=tid, path=(BACKINGS.index(backing), CLASSIFIED.index(classified), extra),
                kind=kind, faults=faults, stall_ns=stall_ns, comm=comm, hists=hists)


def ioctl(pid: int = 100, nr: int = NR_COPY, err: int = 0, *, calls: int = 0, total_ns: int = 0,
          comm: bytes = b"app", latency: dict[int, int] | None = None) -> dict:
    return dict(pid=pid, nr=nr, err=err, calls=calls, total_ns=total_ns, comm=comm, latency=latency or {})


def fault_reading(*aggs: dict) -> tuple[np.ndarray, np.ndarray]:
    keys, values = np.zeros(len(aggs), FAULT_STATS_KEY), np.zeros(len(aggs), FAULT_STATS)
    for i, a in enumerate(aggs):
        for name in ("pid", "tid", "path", "kind"):
            keys[name][i] = a[name]
        for name in ("faults", "stall_ns", "comm"):
            values[name][i] = a[name]
        for h, counts in a["hists"].items():
            for slot, n in counts.items():
                values[h][i, slot] = n
    return keys, values


def ioctl_reading(*aggs: dict) -> tuple[np.ndarray, np.ndarray]:
    keys, values = np.zeros(len(aggs), IOCTL_STATS_KEY), np.zeros(len(aggs), IOCTL_STATS)
    for i, a in enumerate(aggs):
        for name in ("pid", "nr", "err"):
            keys[name][i] = a[name]
        for name in ("calls", "total_ns", "comm"):
            values[name][i] = a[name]
        for slot, n in a["latency"].items():
            values["latency"][i, slot] = n
    return keys, values


def read(agg: Aggregates, faults: tuple[dict, ...] = (), ioctls: tuple[dict, ...] = ()) -> None:
    agg.update(*fault_reading(*faults), *ioctl_reading(*ioctls))


def aggregates(labels: tuple[str, ...] = DEFAULT_LABELS, comms: dict[int, str | None] | None = None,
               max_series: int = 2000) -> Aggregates:
    names = COMMS if comms is None else comms
    return Aggregates(labels, describe, names.get, max_series=max_series)


def buckets(**counts: dict[int, int]) -> np.ndarray:
    """The expected buckets of a fault series."""
    out = np.zeros((len(HISTOGRAMS), STATS_BUCKETS), np.int64)
    for h, slots in counts.items():
        for slot, n in slots.items():
            out[HISTOGRAMS.index(h), slot] = n
    return out


def snapshot(agg: Aggregates) -> tuple[dict, dict, int]:
    return copy.deepcopy(agg.faults), copy.deepcopy(agg.ioctls), agg.dropped


def same(a: tuple[dict, dict, int], b: tuple[dict, dict, int]) -> bool:
    def flat(series: dict) -> dict:
        return {k: (*(v for n, v in vars(s).items() if n != "buckets"), s.buckets.tolist())
                for k, s in series.items()}
    return flat(a[0]) == flat(b[0]) and flat(a[1]) == flat(b[1]) and a[2] == b[2]


# 1. cumulative readings


def test_second_reading_adds_only_the_difference():
    agg = aggregates()
    read(agg, [fault(faults=3, stall_ns=300, stall={2: 3}, wake_to_run={1: 2}, notify={4: 1})])
    read(agg, [fault(faults=5, stall_ns=1000, stall={2: 4, 5: 1}, wake_to_run={1: 2, 3: 2},
                     notify={4: 1}, handler={7: 2})])
    [(labels, series)] = agg.faults.items()
    assert labels == ("app", "anon", "")
    assert (series.faults, series.stall_ns) == (5, 1000)
    assert np.array_equal(series.buckets, buckets(stall={2: 4, 5: 1}, wake_to_run={1: 2, 3: 2},
                                                  notify={4: 1}, handler={7: 2}))
    assert series.buckets.dtype == np.int64
    assert agg.dropped == 0


def test_several_aggregates_of_one_series_add_up():
    agg = aggregates()
    other_path = fault(extra=1, faults=3, stall_ns=30, stall={1: 3})
    read(agg, [fault(faults=2, stall_ns=20, stall={1: 2}), other_path])
    read(agg, [fault(faults=4, stall_ns=40, stall={1: 4}), other_path])
    [series] = agg.faults.values()
    assert (series.faults, series.stall_ns, series.buckets[STALL, 1]) == (7, 70, 7)


def test_faults_going_down_is_a_new_aggregate_under_the_same_key():
    agg = aggregates()
    read(agg, [fault(faults=10, stall_ns=1000, stall={3: 10})])
    read(agg, [fault(faults=4, stall_ns=400, stall={3: 1, 6: 3})])  # gone and back: counts whole
    [series] = agg.faults.values()
    assert (series.faults, series.stall_ns) == (14, 1400)
    assert np.array_equal(series.buckets, buckets(stall={3: 11, 6: 3}))
    read(agg, [fault(faults=6, stall_ns=700, stall={3: 2, 6: 4})])  # ... and counts on from there
    assert (series.faults, series.stall_ns) == (16, 1700)
    assert np.array_equal(series.buckets, buckets(stall={3: 12, 6: 4}))


def test_u32_buckets_that_wrapped_give_the_small_difference():
    agg = aggregates()
    near = 2**32 - 3
    read(agg, [fault(faults=2**40, stall_ns=2**50, stall={3: near}, handler={0: 2**32 - 1},
                     wake_to_run={9: 7})])
    before = agg.faults[("app", "anon", "")].buckets.copy()
    read(agg, [fault(faults=2**40 + 9, stall_ns=2**50 + 90, stall={3: 4}, handler={0: 1},
                     wake_to_run={9: 7})])  # near + 7 and 2^32 - 1 + 2, modulo 2^32
    series = agg.faults[("app", "anon", "")]
    assert (series.faults, series.stall_ns) == (2**40 + 9, 2**50 + 90)
    assert np.array_equal(series.buckets - before, buckets(stall={3: 7}, handler={0: 2}))
    assert (series.buckets >= 0).all()


def test_ioctl_latency_buckets_wrap_too():
    agg = aggregates()
    read(agg, ioctls=[ioctl(calls=5, total_ns=50, latency={2: 2**32 - 2})])
    read(agg, ioctls=[ioctl(calls=8, total_ns=80, latency={2: 1})])
    [series] = agg.ioctls.values()
    assert (series.calls, series.total_ns, series.buckets[2]) == (8, 80, 2**32 - 2 + 3)


def test_an_aggregate_without_gain_changes_nothing():
    agg = aggregates()
    reading = [fault(faults=3, stall_ns=30, stall={1: 3}), fault(200, comm=b"qemu", faults=1, stall={0: 1})]
    calls = [ioctl(calls=2, total_ns=20, latency={1: 2})]
    read(agg, reading, calls)
    before = snapshot(agg)
    read(agg, reading, calls)
    read(agg, reading, calls)
    assert same(snapshot(agg), before)


def test_a_new_aggregate_without_faults_makes_no_series():
    agg = aggregates()
    read(agg, [fault(faults=0)], [ioctl(calls=0)])
    assert agg.faults == {} and agg.ioctls == {} and agg.dropped == 0
    read(agg, [fault(faults=1, stall={0: 1})], [ioctl(calls=1, latency={0: 1})])
    assert agg.faults[("app", "anon", "")].faults == 1
    assert agg.ioctls[("app", "copy", "0")].calls == 1


def test_readings_may_reuse_one_buffer():
    """The last reading is kept as a copy: a backend may fill the same arrays again."""
    agg = aggregates()
    keys, values = fault_reading(fault(faults=3, stall_ns=30, stall={1: 3}))
    ikeys, ivalues = ioctl_reading(ioctl(calls=1, total_ns=5, latency={0: 1}))
    agg.update(keys, values, ikeys, ivalues)
    values["faults"][0], values["stall_ns"][0], values["stall"][0, 1] = 5, 50, 5
    ivalues["calls"][0], ivalues["total_ns"][0], ivalues["latency"][0, 0] = 4, 20, 4
    agg.update(keys, values, ikeys, ivalues)
    [series], [calls] = agg.faults.values(), agg.ioctls.values()
    assert (series.faults, series.stall_ns, series.buckets[STALL, 1]) == (5, 50, 5)
    assert (calls.calls, calls.total_ns, calls.buckets[0]) == (4, 20, 4)


def test_the_classifier_is_asked_about_new_keys_only():
    asked: list[int] = []

    def counting(keys: np.ndarray):
        asked.append(len(keys))
        return describe(keys)

    agg = Aggregates(DEFAULT_LABELS, counting, COMMS.get)
    read(agg, [fault(faults=1)])
    read(agg, [fault(faults=2), fault(200, faults=1, backing="shmem")])
    read(agg, [fault(faults=3), fault(200, faults=1, backing="shmem")])
    read(agg, ioctls=[ioctl(calls=1)])
    assert asked == [1, 1]


def test_a_torn_reading_loses_no_stall():
    """BPF counts a fault in steps (v->faults++, then stall_ns, then the buckets), on its own
    CPU, while user space may copy that CPU's value: a reading can see the fault without its
    stall. The next reading has the stall but no new fault."""
    agg = aggregates()
    read(agg, [fault(faults=1)], [ioctl(calls=1)])  # torn: counted, not timed yet
    read(agg, [fault(faults=1, stall_ns=500, stall={8: 1})], [ioctl(calls=1, total_ns=70, latency={6: 1})])
    series, calls = agg.faults[("app", "anon", "")], agg.ioctls[("app", "copy", "0")]
    assert (series.stall_ns, series.buckets[STALL, 8]) == (500, 1)
    assert (calls.total_ns, calls.buckets[6]) == (70, 1)


# 2. labels


@pytest.mark.parametrize(("labels", "expected"), [
    (("comm", "backing", "kind"), ("app", "shmem", "minor")),
    (("comm", "pid"), ("app", "100")),
    (("kind", "pid"), ("minor", "100")),
    (FAULT_LABELS, ("app", "100", "shmem", "minor", "")),
    ((), ()),
])
def test_labels_are_the_chosen_subset_in_their_order(labels, expected):
    agg = aggregates(labels)
    read(agg, [fault(backing="shmem", classified="minor", faults=1)])
    assert list(agg.faults) == [expected]
    assert agg.labels == labels


def test_default_labels():
    assert aggregates().labels == DEFAULT_LABELS == ("comm", "backing", "kind")


@pytest.mark.parametrize("code", sorted(STATS_KINDS))
def test_the_kind_of_the_key_beats_the_classifier(code):
    agg = aggregates(("kind",))
    other = next(k for k in CLASSIFIED if k and k != STATS_KINDS[code])
    read(agg, [fault(kind=code, classified=other, faults=1)])
    assert list(agg.faults) == [(STATS_KINDS[code],)]


def test_without_a_kind_in_the_key_the_classifier_tells():
    agg = aggregates(("pid", "kind"))
    read(agg, [fault(100, classified="wp", faults=1), fault(200, classified=None, faults=1)])
    assert set(agg.faults) == {("100", "wp"), ("200", "")}


def test_missing_backing_is_empty():
    agg = aggregates(("backing",))
    read(agg, [fault(backing=None, faults=1)])
    assert list(agg.faults) == [("",)]


@pytest.mark.parametrize(("tid", "comm", "vcpu"), [
    (7, b"CPU 3/KVM", "3"),
    (8, b"CPU 12/TCG", "12"),
    (0, b"CPU 3/KVM", ""),  # threads not told apart: no vcpu
    (7, b"worker", ""),
    (7, b"xCPU 3/KVM", ""),
])
def test_vcpu_from_the_thread_name_when_threads_are_told_apart(tid, comm, vcpu):
    agg = aggregates(("pid", "vcpu"))
    read(agg, [fault(200, tid=tid, comm=comm, faults=1)])
    assert list(agg.faults) == [("200", vcpu)]


def test_vcpu_from_qmp_before_the_thread_name():
    """--qmp names vCPU threads whatever they are called (no -name debug-threads=on)."""
    agg = Aggregates(("pid", "vcpu"), describe, COMMS.get, vcpus={7: 5})
    read(agg, [fault(200, tid=7, comm=b"qemu-system-x86", faults=1),
               fault(200, tid=8, comm=b"CPU 1/KVM", faults=1)])
    assert set(agg.faults) == {("200", "5"), ("200", "1")}


def test_comm_from_the_callback_else_the_aggregates():
    agg = aggregates(("comm", "pid", "vcpu"), comms={200: "qemu-system-x86", 300: None})
    read(agg, [fault(200, tid=201, comm=b"CPU 0/KVM", faults=1),
               fault(300, comm=b"lonely", faults=1)],
         [ioctl(200, comm=b"qemu-handler", calls=1), ioctl(300, comm=b"lonely", calls=1)])
    assert set(agg.faults) == {("qemu-system-x86", "200", "0"), ("lonely", "300", "")}
    assert set(agg.ioctls) == {("qemu-system-x86", "200", "copy", "0"), ("lonely", "300", "copy", "0")}


def test_a_process_keeps_the_comm_it_was_first_seen_with():
    names = {100: "first"}
    agg = Aggregates(("comm",), describe, names.get)
    read(agg, [fault(faults=1)])
    names[100] = "renamed"
    read(agg, [fault(faults=2), fault(extra=1, faults=1)], [ioctl(calls=1)])
    assert set(agg.faults) == {("first",)} and set(agg.ioctls) == {("first", "copy", "0")}
    assert agg.comm_label(100) == "first"


def test_comm_label_falls_back_to_question_mark():
    agg = aggregates(comms={})
    assert agg.comm_label(4242) == "?"
    assert agg.comm_label(4243, b"named") == "named"


@pytest.mark.parametrize("labels", [("comm", "tid"), ("nope",), ("errno",)])
def test_unknown_labels_raise(labels):
    with pytest.raises(ValueError, match="unknown labels"):
        aggregates(labels)


@pytest.mark.parametrize(("labels", "ioctl_labels"), [
    (DEFAULT_LABELS, ("comm",)),
    (("pid", "kind", "comm"), ("comm", "pid")),
    (("backing", "kind", "vcpu"), ()),
])
def test_ioctl_labels_are_the_process_labels_chosen(labels, ioctl_labels):
    agg = aggregates(labels)
    assert agg.ioctl_labels == ioctl_labels
    read(agg, ioctls=[ioctl(calls=1)])
    assert list(agg.ioctls) == [(*(dict(comm="app", pid="100")[lb] for lb in ioctl_labels), "copy", "0")]


# 3. the bound


LABELS_CPBK = ("comm", "pid", "backing", "kind")


def test_past_max_series_new_label_sets_go_to_the_overflow_series():
    agg = aggregates(LABELS_CPBK, max_series=2)
    early = [fault(100, classified="missing", faults=1),
             fault(200, comm=b"qemu", classified="missing", faults=1)]
    read(agg, early)
    assert set(agg.faults) == {("app", "100", "anon", "missing"), ("qemu", "200", "anon", "missing")}
    assert agg.dropped == 0
    late = [fault(300, comm=b"db", backing="shmem", classified="wp", faults=4, stall_ns=40, stall={2: 4}),
            fault(400, comm=b"x", classified="missing", faults=2)]
    read(agg, [*early, *late])
    assert agg.dropped == 2
    assert agg.faults[(OVERFLOW, OVERFLOW, "shmem", "wp")].faults == 4
    assert agg.faults[(OVERFLOW, OVERFLOW, "shmem", "wp")].stall_ns == 40
    assert agg.faults[(OVERFLOW, OVERFLOW, "anon", "missing")].faults == 2
    assert ("db", "300", "shmem", "wp") not in agg.faults


def test_an_aggregate_is_dropped_once_and_stays_in_the_overflow_series():
    agg = aggregates(LABELS_CPBK, max_series=1)
    read(agg, [fault(100, faults=1)])
    for n in range(1, 6):
        read(agg, [fault(100, faults=1), fault(300, comm=b"db", faults=n * 10),
                   fault(300, comm=b"db", extra=1, faults=n)])
        assert agg.dropped == 2  # two aggregates of one refused label set: each counted, once
    assert agg.faults[(OVERFLOW, OVERFLOW, "anon", "")].faults == 55
    assert set(agg.faults) == {("app", "100", "anon", ""), (OVERFLOW, OVERFLOW, "anon", "")}


def test_a_new_aggregate_of_an_existing_series_is_no_overflow():
    agg = aggregates(LABELS_CPBK, max_series=1)
    read(agg, [fault(100, faults=1)])
    read(agg, [fault(100, faults=1), fault(100, extra=7, faults=5), fault(100, tid=3, faults=2)])
    assert agg.dropped == 0
    assert agg.faults == {("app", "100", "anon", ""): agg.faults[("app", "100", "anon", "")]}
    assert agg.faults[("app", "100", "anon", "")].faults == 8


def test_the_bound_counts_faults_and_ioctls_together():
    agg = aggregates(DEFAULT_LABELS, max_series=2)
    read(agg, [fault(100, faults=1)], [ioctl(100, calls=1)])
    read(agg, [fault(100, faults=1)], [ioctl(100, calls=1), ioctl(200, NR_CONTINUE, comm=b"qemu", calls=3),
                                       ioctl(100, NR_COPY, 17, calls=2)])
    assert agg.dropped == 2
    assert agg.ioctls[(OVERFLOW, "continue", "0")].calls == 3
    assert agg.ioctls[(OVERFLOW, "copy", "EEXIST")].calls == 2
    read(agg, [fault(100, faults=1), fault(200, comm=b"qemu", faults=9)], [ioctl(100, calls=4)])
    assert agg.dropped == 3
    assert agg.faults[(OVERFLOW, "anon", "")].faults == 9
    assert agg.ioctls[("app", "copy", "0")].calls == 4  # its series existed: not dropped


def test_the_overflow_series_hides_vcpu_too():
    agg = aggregates(FAULT_LABELS, max_series=1)
    read(agg, [fault(100, faults=1), fault(200, tid=201, comm=b"CPU 1/KVM", classified="minor", faults=3)])
    assert agg.dropped == 1
    assert agg.faults[(OVERFLOW, OVERFLOW, "anon", "minor", OVERFLOW)].faults == 3


AGGS = [fault(pid, tid=tid, backing=backing, classified=kind, comm=b"CPU 2/KVM" if tid else b"proc")
        for pid in (100, 200, 300) for tid in (0, 5)
        for backing, kind in (("anon", None), ("shmem", "minor"))]
IOCTLS = [ioctl(pid, nr, err) for pid in (100, 200, 300)
          for nr, err in ((NR_COPY, 0), (NR_COPY, 17), (NR_API, 0))]


def cumulative(faults: list[int], calls: list[int]) -> tuple[list[dict], list[dict]]:
    return ([{**a, "faults": n, "stall_ns": 10 * n, "hists": {"stall": {i % STATS_BUCKETS: n}}}
             for i, (a, n) in enumerate(zip(AGGS, faults, strict=True))],
            [{**a, "calls": n, "total_ns": 3 * n, "latency": {1: n}}
             for a, n in zip(IOCTLS, calls, strict=True)])


@settings(max_examples=60, deadline=None)
@given(max_series=st.integers(0, 8), labels=st.sampled_from([DEFAULT_LABELS, FAULT_LABELS, ("pid",)]),
       steps=st.lists(st.tuples(st.lists(st.integers(0, len(AGGS) - 1), max_size=6),
                                st.lists(st.integers(0, len(IOCTLS) - 1), max_size=3)),
                      min_size=1, max_size=6))
def test_counts_are_conserved_under_the_bound(max_series, labels, steps):
    agg = aggregates(labels, max_series=max_series)
    faults, calls = [0] * len(AGGS), [0] * len(IOCTLS)
    for fault_steps, ioctl_steps in steps:
        for i in fault_steps:
            faults[i] += 1
        for i in ioctl_steps:
            calls[i] += 1
        read(agg, *cumulative(faults, calls))
    assert sum(s.faults for s in agg.faults.values()) == sum(faults)
    assert sum(s.stall_ns for s in agg.faults.values()) == 10 * sum(faults)
    assert sum(int(s.buckets.sum()) for s in agg.faults.values()) == sum(faults)
    assert sum(s.calls for s in agg.ioctls.values()) == sum(calls)
    assert sum(s.total_ns for s in agg.ioctls.values()) == 3 * sum(calls)
    assert sum(int(s.buckets.sum()) for s in agg.ioctls.values()) == sum(calls)
    # every label set here has a process label: series of their own stay within the bound
    own = [k for k in (*agg.faults, *agg.ioctls) if OVERFLOW not in k]
    assert len(own) <= max_series
    counted = sum(n > 0 for n in faults) + sum(n > 0 for n in calls)
    assert agg.dropped <= counted
    if agg.dropped == 0:
        assert not any(OVERFLOW in k for k in (*agg.faults, *agg.ioctls))
    else:
        assert len(own) == max_series
    before = snapshot(agg)
    read(agg, *cumulative(faults, calls))
    assert same(snapshot(agg), before)  # nothing new: nothing dropped again either


# 4. forget


def test_forget_keeps_the_counts_and_the_other_keys():
    agg = aggregates(("comm", "pid"))
    read(agg, [fault(100, faults=5, stall_ns=50), fault(200, comm=b"qemu", faults=2)], [ioctl(100, calls=3)])
    agg.forget({100})
    assert agg.faults[("app", "100")].faults == 5 and agg.ioctls[("app", "100", "copy", "0")].calls == 3
    read(agg, [fault(200, comm=b"qemu", faults=6)])
    assert agg.faults[("qemu", "200")].faults == 6
    assert agg.faults[("app", "100")].faults == 5


def test_a_key_of_a_forgotten_pid_starts_fresh():
    agg = aggregates(("comm", "pid"))
    read(agg, [fault(100, faults=5, stall_ns=50, stall={1: 5})], [ioctl(100, calls=3, total_ns=30)])
    agg.forget({100})
    # a new process with the pid: its aggregate counts whole, even above the old reading
    read(agg, [fault(100, faults=7, stall_ns=70, stall={1: 7})], [ioctl(100, calls=4, total_ns=40)])
    series, calls = agg.faults[("app", "100")], agg.ioctls[("app", "100", "copy", "0")]
    assert (series.faults, series.stall_ns, series.buckets[STALL, 1]) == (12, 120, 12)
    assert (calls.calls, calls.total_ns) == (7, 70)
    agg.forget({100})
    read(agg, [fault(100, faults=2, stall_ns=20, stall={1: 2})])  # below: no negative difference
    assert (series.faults, series.stall_ns, series.buckets[STALL, 1]) == (14, 140, 14)


def test_a_reused_pid_is_named_again():
    names = {100: "old"}
    agg = Aggregates(("comm", "pid"), describe, names.get)
    read(agg, [fault(100, faults=1)])
    agg.forget({100})
    names[100] = "new"
    read(agg, [fault(100, faults=1)])
    assert agg.faults[("old", "100")].faults == 1
    assert agg.faults[("new", "100")].faults == 1


def test_forget_unknown_pids_is_harmless():
    agg = aggregates()
    read(agg, [fault(100, faults=1)])
    agg.forget({12345})
    agg.forget(set())
    read(agg, [fault(100, faults=3)])
    assert agg.faults[("app", "anon", "")].faults == 3


def test_a_reused_pid_finds_its_series_when_the_bound_is_reached():
    agg = aggregates(("comm", "pid"), max_series=1)
    read(agg, [fault(100, faults=2)])
    agg.forget({100})
    read(agg, [fault(100, faults=1)])
    assert agg.dropped == 0 and agg.faults[("app", "100")].faults == 3


# 5. ioctl series


def test_ioctl_series_by_command_and_errno():
    agg = aggregates(("comm", "pid", "kind"))
    read(agg, ioctls=[ioctl(100, NR_COPY, 0, calls=4, total_ns=400, latency={3: 4}),
                      ioctl(100, NR_COPY, 17, calls=1, total_ns=10, latency={0: 1}),
                      ioctl(100, NR_API, 0, calls=1, total_ns=5, latency={0: 1}),
                      ioctl(200, NR_CONTINUE, 11, comm=b"qemu", calls=2, total_ns=20, latency={1: 2}),
                      ioctl(200, NR_CONTINUE, 4000, comm=b"qemu", calls=1, total_ns=1, latency={0: 1})])
    assert set(agg.ioctls) == {("app", "100", "copy", "0"), ("app", "100", "copy", "EEXIST"),
                               ("app", "100", "api", "0"), ("qemu", "200", "continue", "EAGAIN"),
                               ("qemu", "200", "continue", "4000")}
    assert agg.ioctl_labels == ("comm", "pid")
    read(agg, ioctls=[ioctl(100, NR_COPY, 0, calls=6, total_ns=700, latency={3: 5, 4: 1})])
    copy_ok = agg.ioctls[("app", "100", "copy", "0")]
    assert (copy_ok.calls, copy_ok.total_ns) == (6, 700)
    expected = np.zeros(STATS_BUCKETS, np.int64)
    expected[3], expected[4] = 5, 1
    assert np.array_equal(copy_ok.buckets, expected)
    assert agg.faults == {}


@pytest.mark.parametrize("nr", sorted(UFFDIO_NAMES))
def test_every_named_ioctl_is_lower_case(nr):
    agg = aggregates(("pid",))
    read(agg, ioctls=[ioctl(nr=nr, calls=1)])
    assert list(agg.ioctls) == [("100", UFFDIO_NAMES[nr].lower(), "0")]


def test_ioctls_of_one_label_set_add_up():
    agg = aggregates(("kind",))  # no process labels: every process's COPY in one series
    read(agg, ioctls=[ioctl(100, calls=2, total_ns=20, latency={1: 2}),
                      ioctl(200, calls=3, total_ns=30, latency={2: 3})])
    assert list(agg.ioctls) == [("copy", "0")]
    s = agg.ioctls[("copy", "0")]
    assert (s.calls, s.total_ns, s.buckets[1], s.buckets[2]) == (5, 50, 2, 3)


def test_ioctl_calls_going_down_is_a_new_aggregate():
    agg = aggregates()
    read(agg, ioctls=[ioctl(calls=5, total_ns=50)])
    read(agg, ioctls=[ioctl(calls=2, total_ns=20)])
    assert agg.ioctls[("app", "copy", "0")].calls == 7
    assert agg.ioctls[("app", "copy", "0")].total_ns == 70


# 6. the exporter


class FakeBackend:
    def __init__(self, tracked: dict[int, int]) -> None:
        self._tracked = tracked

    def lost(self) -> dict[str, int]:
        return {"ringbuf_full": 0, "stats_map_full": 3}

    def program_stats(self) -> dict[str, tuple[int, int]]:
        return {"page_fault_user": (2_500_000_000, 40), "uffd_ioctl": (1_000, 2)}

    def tracked(self) -> dict[int, int]:
        return self._tracked


APP = {"comm": "app", "backing": "anon", "kind": "missing"}
QEMU = {"comm": "qemu", "backing": "shmem", "kind": "minor"}


def exporter(blocked: list[BlockedFault] | None = None) -> tuple[Exporter, Aggregates]:
    agg = aggregates(max_series=5)
    app_qemu = [fault(100, classified="missing", faults=6, stall_ns=3_000_000, stall={0: 2, 3: 4},
                      wake_to_run={1: 5}),
                fault(200, comm=b"qemu", backing="shmem", classified="minor", faults=2, stall_ns=7,
                      handler={2: 1})]
    ioctls = [ioctl(100, NR_COPY, 0, calls=4, total_ns=4000, latency={1: 3, 2: 1}),
              ioctl(100, NR_COPY, 17, calls=2, total_ns=100, latency={0: 2}),
              ioctl(200, NR_CONTINUE, 0, comm=b"qemu", calls=1, total_ns=9, latency={5: 1})]
    read(agg, app_qemu, ioctls)
    read(agg, [*app_qemu, fault(300, comm=b"db", backing="hugetlb", classified="wp", faults=1)], ioctls)
    assert agg.dropped == 1  # db's faults: a 6th label set
    feed = SimpleNamespace(aggregates=agg, events={("app", "fork"): 2, ("qemu", "remove"): 1})
    session = SimpleNamespace(
        backend=FakeBackend({100: ROLE_TARGET, 101: ROLE_HANDLER,
                             102: ROLE_DISCOVERED, 103: ROLE_DISCOVERED}),
        blocked=[] if blocked is None else blocked, startup_s=0.25)
    return Exporter(feed, session), agg


def families(collector: Exporter) -> dict:
    out = {}
    for family in collector.collect():
        assert family.name not in out
        out[family.name] = family
    return out


def samples(family, suffix: str = "") -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value
            for s in family.samples if s.name == family.name + suffix}


def key(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


EXPECTED_FAMILIES = {
    "uffdtrace_faults": "counter",
    "uffdtrace_blocked_seconds": "counter",
    "uffdtrace_fault_stall_seconds": "histogram",
    "uffdtrace_fault_wake_to_run_seconds": "histogram",
    "uffdtrace_fault_notify_seconds": "histogram",
    "uffdtrace_fault_handler_seconds": "histogram",
    "uffdtrace_ioctls": "counter",
    "uffdtrace_ioctl_seconds": "histogram",
    "uffdtrace_uffd_events": "counter",
    "uffdtrace_faults_blocked": "gauge",
    "uffdtrace_oldest_blocked_fault_age_seconds": "gauge",
    "uffdtrace_lost_events": "counter",
    "uffdtrace_bpf_run_seconds": "counter",
    "uffdtrace_bpf_runs": "counter",
    "uffdtrace_startup_seconds": "gauge",
    "uffdtrace_traced_processes": "gauge",
    "uffdtrace_series_dropped": "counter",
}


def test_exporter_families_and_types():
    fams = families(exporter()[0])
    assert {name: f.type for name, f in fams.items()} == EXPECTED_FAMILIES
    for name, f in fams.items():
        if f.type == "counter":
            assert all(s.name == name + "_total" for s in f.samples), name
        assert f.documentation


def test_exporter_fault_counters():
    fams = families(exporter()[0])
    other = {"comm": OVERFLOW, "backing": "hugetlb", "kind": "wp"}
    assert samples(fams["uffdtrace_faults"], "_total") == {key(**APP): 6, key(**QEMU): 2, key(**other): 1}
    seconds = samples(fams["uffdtrace_blocked_seconds"], "_total")
    assert seconds == {key(**APP): pytest.approx(3e-3), key(**QEMU): pytest.approx(7e-9), key(**other): 0}
    assert samples(fams["uffdtrace_series_dropped"], "_total") == {(): 1}


def test_exporter_stall_histogram():
    stall = families(exporter()[0])["uffdtrace_fault_stall_seconds"]
    app = [s for s in stall.samples if s.labels.get("comm") == "app"]
    bucket_samples = [s for s in app if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in bucket_samples][:4] == ["2e-06", "4e-06", "8e-06", "1.6e-05"]
    assert bucket_samples[-1].labels["le"] == "+Inf"
    assert len(bucket_samples) == STATS_BUCKETS
    assert all({k: s.labels[k] for k in APP} == APP for s in app)
    assert [s.value for s in bucket_samples] == [2, 2, 2, 6, *[6] * (STATS_BUCKETS - 4)]  # cumulative
    [count] = [s.value for s in app if s.name.endswith("_count")]
    [total] = [s.value for s in app if s.name.endswith("_sum")]
    assert count == 6
    assert total == pytest.approx(3_000_000 * 1e-9)
    # qemu's and db's faults have no stall buckets: no stall series for them
    assert {s.labels["comm"] for s in stall.samples} == {"app"}


def test_exporter_leaves_out_histograms_without_counts():
    fams = families(exporter()[0])
    comms = {h: {s.labels["comm"] for s in fams[f"uffdtrace_fault_{h}_seconds"].samples} for h in HISTOGRAMS}
    assert comms == {"stall": {"app"}, "wake_to_run": {"app"}, "notify": set(), "handler": {"qemu"}}
    handler = fams["uffdtrace_fault_handler_seconds"]
    cumulative = [s.value for s in handler.samples if s.name.endswith("_bucket")]
    assert cumulative == [0, 0, 1, *[1] * (STATS_BUCKETS - 3)]
    # no sum is kept of these phases: no _sum (nor _count) is made up
    assert {s.name for s in handler.samples} == {"uffdtrace_fault_handler_seconds_bucket"}


def test_exporter_ioctls():
    fams = families(exporter()[0])
    assert samples(fams["uffdtrace_ioctls"], "_total") == {
        key(comm="app", ioctl="copy", errno="0"): 4, key(comm="app", ioctl="copy", errno="EEXIST"): 2,
        key(comm="qemu", ioctl="continue", errno="0"): 1}
    seconds = fams["uffdtrace_ioctl_seconds"]
    copy_ = [s for s in seconds.samples if s.labels["ioctl"] == "copy"]
    assert all(set(s.labels) - {"le"} == {"comm", "ioctl"} for s in seconds.samples)  # errno summed
    assert [s.value for s in copy_ if s.name.endswith("_bucket")][:4] == [2, 5, 6, 6]
    assert samples(seconds, "_count")[key(comm="app", ioctl="copy")] == 6
    assert samples(seconds, "_sum")[key(comm="app", ioctl="copy")] == pytest.approx(4100e-9)
    assert samples(seconds, "_sum")[key(comm="qemu", ioctl="continue")] == pytest.approx(9e-9)


def test_exporter_events_and_the_tracer():
    fams = families(exporter()[0])
    assert samples(fams["uffdtrace_uffd_events"], "_total") == {
        key(comm="app", event="fork"): 2, key(comm="qemu", event="remove"): 1}
    assert samples(fams["uffdtrace_lost_events"], "_total") == {
        key(reason="ringbuf_full"): 0, key(reason="stats_map_full"): 3}
    assert samples(fams["uffdtrace_bpf_run_seconds"], "_total") == {
        key(program="page_fault_user"): pytest.approx(2.5), key(program="uffd_ioctl"): pytest.approx(1e-6)}
    assert samples(fams["uffdtrace_bpf_runs"], "_total") == {
        key(program="page_fault_user"): 40, key(program="uffd_ioctl"): 2}
    assert samples(fams["uffdtrace_startup_seconds"]) == {(): 0.25}
    assert samples(fams["uffdtrace_traced_processes"]) == {(): 2}  # the discovered ones are not yet


def test_exporter_blocked_faults():
    now = time.monotonic_ns()
    blocked = [BlockedFault(100, 101, 0x7F0000001000, now - 5_000_000_000),
               BlockedFault(100, 102, 0x7F0000002000, now - 1_000_000_000)]
    fams = families(exporter(blocked)[0])
    assert samples(fams["uffdtrace_faults_blocked"]) == {(): 2}
    [age] = samples(fams["uffdtrace_oldest_blocked_fault_age_seconds"]).values()
    assert 5.0 <= age < 5.0 + (time.monotonic_ns() - now) * 1e-9 + 1e-6
    fams = families(exporter([])[0])
    assert samples(fams["uffdtrace_faults_blocked"]) == {(): 0}
    assert samples(fams["uffdtrace_oldest_blocked_fault_age_seconds"]) == {(): 0.0}


def test_exporter_with_nothing_counted_yet():
    agg = aggregates()
    feed = SimpleNamespace(aggregates=agg, events={})
    session = SimpleNamespace(backend=FakeBackend({}), blocked=[], startup_s=0.0)
    fams = families(Exporter(feed, session))
    assert set(fams) == set(EXPECTED_FAMILIES)
    for name in ("uffdtrace_faults", "uffdtrace_ioctl_seconds", "uffdtrace_fault_stall_seconds"):
        assert fams[name].samples == []
    assert samples(fams["uffdtrace_traced_processes"]) == {(): 0}


def test_exporter_scrapes_as_text():
    collector, agg = exporter([BlockedFault(1, 2, 3, time.monotonic_ns())])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: f.type for name, f in parsed.items()} == EXPECTED_FAMILIES
    assert 'uffdtrace_faults_total{backing="anon",comm="app",kind="missing"} 6.0' in text
    stall = parsed["uffdtrace_fault_stall_seconds"]
    les = [s.labels["le"] for s in stall.samples if s.name.endswith("_bucket")]
    assert les[0] == "2e-06" and les[-1] == "+Inf" and len(les) == STATS_BUCKETS
    assert [float(le) for le in les] == sorted(float(le) for le in les)
    [total] = [s.value for s in stall.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(agg.faults[("app", "anon", "missing")].stall_ns * 1e-9)
    assert samples(parsed["uffdtrace_series_dropped"], "_total") == {(): 1}
    assert samples(parsed["uffdtrace_ioctls"], "_total")[key(comm="app", ioctl="copy", errno="EEXIST")] == 2


def test_bucket_bounds_are_powers_of_two_of_a_microsecond():
    assert len(BUCKET_BOUNDS_S) == STATS_BUCKETS
    assert BUCKET_BOUNDS_S[:3] == (2e-6, 4e-6, 8e-6) and math.isinf(BUCKET_BOUNDS_S[-1])
    assert all(b == pytest.approx(2 ** (n + 1) * 1e-6, rel=1e-12) for n, b in enumerate(BUCKET_BOUNDS_S[:-1]))


def test_le_labels_are_the_exact_bucket_bounds():
    stall = families(exporter()[0])["uffdtrace_fault_stall_seconds"]
    les = [s.labels["le"] for s in stall.samples if s.name.endswith("_bucket") and s.labels["comm"] == "app"]
    assert [float(le) for le in les[:-1]] == [pytest.approx(b, rel=1e-12) for b in BUCKET_BOUNDS_S[:-1]]


class DyingBackend:
    """A stats-mode backend whose only process (a handler, traced) makes one more ioctl and
    exits just after each reading: the race between a process's last counts and its end."""

    def __init__(self) -> None:
        self.calls, self.dead, self.forgotten = 1, False, set()

    def tracked(self) -> dict[int, int]:
        return {} if 100 in self.forgotten else {100: ROLE_HANDLER}

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "fault_stats":
            return fault_reading()
        if 100 in self.forgotten:
            return ioctl_reading()
        reading = ioctl_reading(ioctl(100, NR_COPY, 0, calls=self.calls))
        self.calls, self.dead = self.calls + 1, True  # its last COPY, then exit
        return reading

    def uffd_event_counts(self) -> dict[tuple[int, int], int]:
        return {}

    def forget(self, pids: set[int]) -> None:
        self.forgotten |= pids


def test_a_process_gone_after_the_reading_is_read_once_more(monkeypatch):
    backend = DyingBackend()
    monkeypatch.setattr("uffdtrace.stats.alive", lambda pid: not backend.dead)
    agg = aggregates(("comm", "pid"))
    feed = StatsFeed(backend, agg)
    feed.tick(now=True)  # reads 1 call; the process then makes its 2nd and exits
    feed.tick(now=True)  # gone: read once more (2 calls), then forgotten
    feed.tick(now=True)
    assert backend.forgotten == {100}
    assert agg.ioctls[("app", "100", "copy", "0")].calls == 2
