# Curvature of every trained checkpoint, one NetCDF per checkpoint, one job per (workload, seed): a checkpoint
# takes ~0.25 s on digits while a job's start costs ~2 s (torch, xarray),
# so a job per checkpoint, or per (batch size, seed), would spend most of the study starting processes. Adding
# a seed analyses only the new seed's checkpoints. Adding a batch size reruns the workload's jobs, which read the
# analyses of unchanged checkpoints back (HESSIAN_REUSE, keyed by the checkpoint's bytes, the slice and the
# version) and analyse only the new ones. Its params carry only the hessian slice: changing hessian.* reruns no
# training.
rule analyze_hessian:
    input:
        data=rules.prepare_data.output[0],
        checkpoints=seed_train_dirs,
    output:
        directory("results/hessian/{workload}/seed{seed}"),
    log:
        "logs/analyze_hessian/{workload}/seed{seed}.log",
    benchmark:
        "results/benchmarks/analyze_hessian/{workload}/seed{seed}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=60,
    params:
        spec=config_slice("analyze_hessian"),
        version=STAGES["analyze_hessian"].version,
        reuse=HESSIAN_REUSE,
    shell:
        "python -m batchscope hessian --spec {params.spec:q} --data {input.data} --reuse {params.reuse}"
        " --checkpoints {input.checkpoints} --out {output} > {log} 2>&1"


# After fit_scaling: the fit decided each batch size's best learning rate once, and holds every run's gap.
rule aggregate_hessian:
    input:
        fit=rules.fit_scaling.output[0],
        hessian=hessian_dirs,
    output:
        "results/hessian/{workload}.nc",
    log:
        "logs/aggregate_hessian/{workload}.log",
    benchmark:
        "results/benchmarks/aggregate_hessian/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        version=STAGES["aggregate_hessian"].version,
        expect=expected_provenance("analyze_hessian", "fit_scaling"),
    shell:
        "python -m batchscope aggregate-hessian --workload {wildcards.workload} --fit {input.fit}"
        " --expect {params.expect:q}"
        " --hessian {input.hessian} --out {output} > {log} 2>&1"


# Optional (edge_of_stability.enabled): one job per step size, on the named workload's data and model.
rule edge_of_stability:
    input:
        data=rules.prepare_data.output[0],
    output:
        "results/edge_of_stability/{workload}/eta{step_size}.nc",
    log:
        "logs/edge_of_stability/{workload}/eta{step_size}.log",
    benchmark:
        "results/benchmarks/edge_of_stability/{workload}/eta{step_size}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("edge_of_stability"),
        version=STAGES["edge_of_stability"].version,
    shell:
        "python -m batchscope edge-of-stability --spec {params.spec:q} --data {input.data}"
        " --step-size {wildcards.step_size} --out {output} > {log} 2>&1"
