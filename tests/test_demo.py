from lowbit import demo


def test_main_job_reports_every_scheme_on_real_weights():
    rows = {r["scheme"]: r for r in demo.run(blocks=1)}
    assert len(rows) == len(demo.SCHEMES)
    assert rows["int8 per-channel"]["sqnr"] > 35 and rows["int8 per-channel"]["bpw"] < 8.1
    assert rows["nf4 g64 double-quant"]["bpw"] < rows["nf4 g64"]["bpw"] - 0.3
    assert rows["int4 g64 mse clip"]["sqnr"] > rows["int4 g64 symmetric"]["sqnr"]
