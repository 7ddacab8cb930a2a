# Gradient noise along one reference run per workload (its train_model job saves snapshots), and the Jensen-bias
# experiment. One NetCDF per snapshot and per experiment.
rule measure_gradient_noise:
    input:
        data=rules.prepare_data.output[0],
        run=rules.train_reference.output[0],
    output:
        directory("results/noise/{workload}"),
    log:
        "logs/measure_gradient_noise/{workload}.log",
    benchmark:
        "results/benchmarks/measure_gradient_noise/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("measure_gradient_noise"),
        snapshots=lambda w, input: reference_file(w, input.run, ".snapshots"),
        version=STAGES["measure_gradient_noise"].version,
    shell:
        "python -m batchscope noise --spec {params.spec:q} --data {input.data}"
        " --snapshots {params.snapshots} --out {output} > {log} 2>&1"


rule measure_jensen_bias:
    input:
        data=rules.prepare_data.output[0],
        run=rules.train_reference.output[0],
    output:
        "results/jensen/{workload}.nc",
    log:
        "logs/measure_jensen_bias/{workload}.log",
    benchmark:
        "results/benchmarks/measure_jensen_bias/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("measure_jensen_bias"),
        checkpoint=lambda w, input: reference_file(w, input.run, ".pt"),
        version=STAGES["measure_jensen_bias"].version,
    shell:
        "python -m batchscope jensen --spec {params.spec:q} --data {input.data}"
        " --checkpoint {params.checkpoint} --out {output} > {log} 2>&1"


rule measure_jensen_linreg:
    output:
        "results/jensen_linreg.nc",
    log:
        "logs/measure_jensen_linreg.log",
    benchmark:
        "results/benchmarks/measure_jensen_linreg.tsv"
    conda:
        "../envs/batchscope.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=json.dumps(bs_noise.jensen_linreg_slice(config), sort_keys=True),
        version=STAGES["measure_jensen_bias"].version,
    shell:
        "python -m batchscope jensen --spec {params.spec:q} --out {output} > {log} 2>&1"


# Optional (branch.enabled): the local critical batch size at each snapshot of the reference run, one job per
# snapshot fraction, named by it (adding a fraction adds only its job: the reference run keeps its states whatever
# the fractions).
rule branch_checkpoint:
    input:
        data=rules.prepare_data.output[0],
        run=rules.train_reference.output[0],
    output:
        "results/branch/{workload}/fraction{fraction}.nc",
    log:
        "logs/branch_checkpoint/{workload}/fraction{fraction}.log",
    benchmark:
        "results/benchmarks/branch_checkpoint/{workload}/fraction{fraction}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("branch_checkpoint"),
        snapshots=lambda w, input: reference_file(w, input.run, ".snapshots"),
        version=STAGES["branch_checkpoint"].version,
    shell:
        "python -m batchscope branch --spec {params.spec:q} --data {input.data} --snapshots {params.snapshots}"
        " --fraction {wildcards.fraction} --out {output} > {log} 2>&1"
