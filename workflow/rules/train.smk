# One job per (workload, batch size, seed) trains that point's learning-rate grid: a digits run takes ~0.2 s
# while a job's process start costs ~2.5 s. Each (lr, seed) point is still its own NetCDF + checkpoint in the
# job's directory. Adding a seed or a batch size schedules only new jobs; the lr list is a param, so changing
# it reruns only that workload's training. The adaptive study trains a batch size's seeds in one job instead
# (train_batch_size, below).
rule train_model:
    input:
        data=rules.prepare_data.output[0],
    output:
        directory("results/train/{workload}/B{batch_size}/seed{seed}"),
    log:
        "logs/train_model/{workload}/B{batch_size}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train_model/{workload}/B{batch_size}/seed{seed}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=60,
    params:
        spec=config_slice("train_model"),
        lrs=learning_rates,
        version=STAGES["train_model"].version,
    shell:
        "python -m batchscope train --spec {params.spec:q} --data {input.data}"
        " --batch-size {wildcards.batch_size} --lrs {params.lrs} --seeds {wildcards.seed}"
        " --out {output} > {log} 2>&1"


# The adaptive study (study: adaptive): one job per chosen batch size trains every seed, into the same per-seed
# directories as train_model. The seeds run in order anyway: the first seed tries the learning rates, likely best
# first, each run capped at the best run's steps so far; each later seed trains the best 1/adaptive.halving_rate of
# the learning rates the seed before it trained (successive halving). One
# job rather than one per seed saves a process start (~2 s, more than a digits run) per later seed. At the reference
# run's batch size the reference run (the quick estimate's, already paid for) is copied, not trained again.
if ADAPTIVE:

    rule train_batch_size:
        input:
            data=rules.prepare_data.output[0],
            reference=reference_run_if_in,
        output:
            directory(expand("results/train/{{workload}}/B{{batch_size}}/seed{seed}", seed=SEEDS)),
        log:
            "logs/train_batch_size/{workload}/B{batch_size}.log",
        benchmark:
            "results/benchmarks/train_batch_size/{workload}/B{batch_size}.tsv"
        conda:
            "../envs/batchscope.yaml"
        threads: config["threads"]
        resources:
            gpu=GPU,
            mem_mb=config["mem_mb"],
            runtime=60 * len(SEEDS),
        params:
            spec=config_slice("train_model"),
            lrs=learning_rates,
            seeds=" ".join(str(seed) for seed in SEEDS),
            reuse=lambda w, input: f"--reuse {input.reference}" if input.reference else "",
            version=STAGES["train_model"].version,
            halving=bs_train.HALVING_VERSION,
            rate=config["adaptive"]["halving_rate"],
        shell:
            "python -m batchscope train --spec {params.spec:q} --data {input.data}"
            " --batch-size {wildcards.batch_size} --lrs {params.lrs} --seeds {params.seeds} --adaptive"
            " --halving-rate {params.rate}"
            " {params.reuse} --out {output} > {log} 2>&1"

    ruleorder: train_batch_size > train_model


# The reference run: one (batch size, learning rate, seed) point of the grid (noise.reference_*), trained once more
# on its own and saving its weights along the way. The gradient-noise, Jensen and quick-estimate stages read it, so
# the quick estimate costs the profile and one run, not the reference batch size's whole learning-rate grid.
rule train_reference:
    input:
        data=rules.prepare_data.output[0],
    output:
        directory("results/reference/{workload}"),
    log:
        "logs/train_reference/{workload}.log",
    benchmark:
        "results/benchmarks/train_reference/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=60,
    params:
        spec=config_slice("train_model"),
        point=lambda w: "--batch-size {} --lrs {lr} --seeds {} --snapshot-lr {lr}".format(
            reference_point(w)[0], reference_point(w)[2], lr=bs_config.format_lr(reference_point(w)[1])
        ),
        # the states it keeps, whatever noise.snapshot_fractions are: they pick from these (adding one retrains nothing)
        fractions=" ".join(str(f) for f in bs_config.kept_fractions(config["noise"]["kept_snapshots"])),
        version=STAGES["train_model"].version,
        snapshots=bs_train.SNAPSHOT_VERSION,
    shell:
        "python -m batchscope train --spec {params.spec:q} --data {input.data} {params.point}"
        " --snapshot-fractions {params.fractions} --out {output} > {log} 2>&1"
