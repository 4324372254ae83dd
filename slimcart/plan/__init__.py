"""`slimcart plan`: find, by measurement, the compressed model that fits a deployment scenario.

    profile.py      scenario profiles (threads, batch, objective, constraints); built-ins in profiles/
    hardware.py     CPU / ISA / memory / GPU probe: decides candidates, recorded in every plan
    energy.py       joules per item: RAPL where readable, else CPU time x watts per core (labelled)
    requests.py     end-to-end timing inputs at the profile's batch
    space.py        the search space: technique compositions as parameters -> Recipe
    sensitivity.py  per-layer sensitivity on validation (seed ladders, report)
    trial.py        build (api.build) -> save -> reload -> measure one trial, at a fidelity
    study.py        the Optuna driver: multi-objective, constraints, screening, resume, workers
    final.py        choose, evaluate once on test, publish OUT
    report_html.py  the self-contained HTML report
    run.py          plan(): input checks, OUT and study set-up, the whole flow
"""
