"""The cluster simulator (`tandem simulate`): how many replicas of each pool a load needs, and
whether the autoscaling policy holds the SLO, on a calibrated model of Tandem.

Layout: `config` (what is simulated), `workload` (requests from traces or synthetic load),
`costs` (the replica profile as vectorised time functions), `fleet` (replica lifecycle and
billing), `control` (the autoscaler's policy in the loop), `per_request` and `cohort` (the two
engines), `result` (SLO attainment, GPU-hours, timelines, plots), `search` (cheapest static
provisioning and the oracle), `run` (one entry point for both modes).
"""
