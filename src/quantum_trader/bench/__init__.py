"""``qt bench``: the chain's latency, throughput and cost, against a reproduction of the seed's design in the
same run.

measure: percentiles, CPU and memory of processes, an open-loop sender.
chain: drives the real chain (sequential, open loop at fixed rates, the decisions ceiling) and reads the
    services' own measurements back from the streams.
seed: the seed's polling design on the same store.
report: the report's shape, its table, markdown and plot.
render: each step's figures printed as the step ends.
run: starts the private system and runs the scenarios in order.
"""
