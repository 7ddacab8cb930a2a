# One job per workload profiles all of its batch sizes in interleaved rounds (batchscope.engine.profiling): drift of the
# machine then falls on every size alike. One NetCDF per batch size; adding a batch size reprofiles the workload.
rule profile_hardware:
    input:
        data=rules.prepare_data.output[0],
    output:
        expand(PROFILE_FILE, workload="{workload}", batch_size=PROFILE_BATCH_SIZES),
    log:
        "logs/profile_hardware/{workload}.log",
    benchmark:
        "results/benchmarks/profile_hardware/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: PROFILE_THREADS
    resources:
        gpu=GPU,
        mem_mb=config["mem_mb"],
        runtime=30,
    params:
        spec=config_slice("profile_hardware"),
        sizes=" ".join(map(str, PROFILE_BATCH_SIZES)),
        version=STAGES["profile_hardware"].version,
    shell:
        "python -m batchscope profile --spec {params.spec:q} --data {input.data}"
        " --batch-size {params.sizes} --out {output} > {log} 2>&1"
