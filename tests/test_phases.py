"""core/phases.py: wall time by phase, each phase its own time, threads' work folded in as shares."""
import threading
import time

from lowbit.core.phases import PhaseClock, phase


def test_nested_phases_count_their_own_time_and_sum_to_the_wall_time():
    clock = PhaseClock()
    t0 = time.perf_counter()
    with clock.running("other"):
        with phase("outer"):
            time.sleep(0.02)
            with phase("inner"):
                time.sleep(0.05)
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    s = clock.seconds
    assert 0.045 < s["inner"] < 0.2 and 0.015 < s["outer"] < 0.045 + 0.02, s
    assert abs(clock.total - wall) < 1e-3
    with phase("nobody listens"):  # outside a running clock: nothing is counted anywhere
        pass
    assert "nobody listens" not in s


def test_threads_work_is_absorbed_as_shares_of_its_wall_time():
    clock, sub = PhaseClock(), PhaseClock()

    def work(name, sec):
        with sub.running("rest"):
            with phase(name):
                time.sleep(sec)
    with clock.running("other"):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(n, 0.06)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        clock.absorb(sub, wall)
    s = clock.seconds
    assert abs(s["a"] + s["b"] + s.get("rest", 0) - wall) < 1e-6  # the two threads' 0.12 s became 0.06 s of wall
    assert abs(s["a"] - s["b"]) < 0.01 and s["other"] < 0.01, s
