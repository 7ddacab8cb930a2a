# The Ghost BatchNorm experiment (ghost.enabled): the base workload's model with each ghost size, trained and
# profiled at the large physical batch; compared with plain BatchNorm at that batch and at the small batch,
# which the main study already trained.
rule train_ghost:
    input:
        data=rules.prepare_data.output[0],
    output:
        directory("results/ghost/{workload}/G{ghost}/train/seed{seed}"),
    log:
        "logs/train_ghost/{workload}/G{ghost}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train_ghost/{workload}/G{ghost}/seed{seed}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=60,
    params:
        spec=lambda w: json.dumps(bs_ghost.ghost_train_slice(config, w.workload, int(w.ghost)), sort_keys=True),
        lrs=lambda w: ghost_learning_rates(w.workload),
        batch_size=config["ghost"]["batch_size"],
        version=STAGES["train_model"].version,
    shell:
        "python -m batchscope train --spec {params.spec:q} --data {input.data} --batch-size {params.batch_size}"
        " --lrs {params.lrs} --seeds {wildcards.seed} --out {output} > {log} 2>&1"


rule profile_ghost:
    input:
        data=rules.prepare_data.output[0],
    output:
        "results/ghost/{workload}/G{ghost}/profile.nc",
    log:
        "logs/profile_ghost/{workload}/G{ghost}.log",
    benchmark:
        "results/benchmarks/profile_ghost/{workload}/G{ghost}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=15,
    params:
        spec=lambda w: json.dumps(bs_ghost.ghost_profile_slice(config, w.workload, int(w.ghost)), sort_keys=True),
        batch_size=config["ghost"]["batch_size"],
        version=STAGES["profile_hardware"].version,
    shell:
        "python -m batchscope profile --spec {params.spec:q} --data {input.data}"
        " --batch-size {params.batch_size} --out {output} > {log} 2>&1"


rule analyze_ghost_hessian:
    input:
        data=rules.prepare_data.output[0],
        checkpoints=rules.train_ghost.output[0],
    output:
        directory("results/ghost/{workload}/G{ghost}/hessian/seed{seed}"),
    log:
        "logs/analyze_ghost_hessian/{workload}/G{ghost}/seed{seed}.log",
    benchmark:
        "results/benchmarks/analyze_ghost_hessian/{workload}/G{ghost}/seed{seed}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("analyze_hessian"),
        version=STAGES["analyze_hessian"].version,
        reuse=HESSIAN_REUSE,
    shell:
        "python -m batchscope hessian --spec {params.spec:q} --reuse {params.reuse} --data {input.data}"
        " --checkpoints {input.checkpoints} --out {output} > {log} 2>&1"


rule ghost_variance:
    input:
        data=rules.prepare_data.output[0],
    output:
        "results/ghost/{workload}/variance.nc",
    log:
        "logs/ghost_variance/{workload}.log",
    benchmark:
        "results/benchmarks/ghost_variance/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=10,
    params:
        spec=config_slice("ghost_variance"),
        version=STAGES["ghost_variance"].version,
    shell:
        "python -m batchscope ghost-variance --spec {params.spec:q} --data {input.data} --out {output} > {log} 2>&1"


rule summarize_ghost:
    input:
        unpack(ghost_summary_inputs),
    output:
        "results/ghost/{workload}.nc",
    log:
        "logs/summarize_ghost/{workload}.log",
    benchmark:
        "results/benchmarks/summarize_ghost/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("summarize_ghost"),
        ghost_runs=lambda w: ghost_pairs(rules.train_ghost, w.workload, SEEDS),
        ghost_profiles=lambda w: ghost_pairs(rules.profile_ghost, w.workload),
        ghost_hessian=lambda w: (
            ghost_pairs(rules.analyze_ghost_hessian, w.workload, SEEDS) if config["hessian"]["enabled"] else ""
        ),
        version=STAGES["summarize_ghost"].version,
    shell:
        "python -m batchscope ghost-summary --spec {params.spec:q} --base-runs {input.base_runs}"
        " --ghost-runs {params.ghost_runs} --base-profile {input.base_profile}"
        " --ghost-profiles {params.ghost_profiles} --variance {input.variance}"
        " --base-hessian {input.base_hessian} --ghost-hessian {params.ghost_hessian} --out {output} > {log} 2>&1"
