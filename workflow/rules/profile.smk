rule profile_hardware:
    input:
        data=rules.prepare_data.output[0],
    output:
        "results/profile/{workload}/B{batch_size}.nc",
    log:
        "logs/profile_hardware/{workload}/B{batch_size}.log",
    benchmark:
        "results/benchmarks/profile_hardware/{workload}/B{batch_size}.tsv"
    conda:
        "../envs/batchscope.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=4000,
        runtime=15,
    params:
        spec=config_slice(bs_config.profile_slice),
        version=ALGORITHM_VERSIONS["profile_hardware"],
    shell:
        "python -m batchscope profile --spec {params.spec:q} --data {input.data}"
        " --batch-size {wildcards.batch_size} --out {output} > {log} 2>&1"
