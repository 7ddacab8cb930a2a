rule prepare_data:
    output:
        "results/data/{workload}.nc",
    params:
        spec=config_slice(bs_config.data_slice),
        version=ALGORITHM_VERSIONS["prepare_data"],
    log:
        "logs/prepare_data/{workload}.log",
    benchmark:
        "results/benchmarks/prepare_data/{workload}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m batchscope prepare-data --spec {params.spec:q} --out {output} > {log} 2>&1"
