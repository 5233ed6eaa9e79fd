"""The run machinery around the scored program: what makes a train.py run trustworthy and readable, and
what the shipped program leaves out (it runs without any of it).

    validate.py      the start-up checks (config, paths, memory, data, byte tables) before anything is built
    preflight.py     each kernel against its reference before priming; which kernels really ran
    checkpoint.py    ckpt/step_N on disk (sha256 per file), resume checks, load
    run_folder.py    runs/<run id>/: one run per folder, its lock, tidying a resumed run
    report.py        train.log / metrics.jsonl, the metric line, report.json + compliance, submission.json
    shipped_code.py  the shipped program: built from the scored modules, its bytes by part

Nothing outside model/run/ imports it except train.py (and the bench and tests).
"""
