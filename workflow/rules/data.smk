rule prepare_data:
    output:
        "results/data/{workload}.nc",
    log:
        "logs/prepare_data/{workload}.log",
    benchmark:
        "results/benchmarks/prepare_data/{workload}.tsv"
    conda:
        "../envs/batchscope.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=config_slice("prepare_data"),
        version=STAGES["prepare_data"].version,
    shell:
        "python -m batchscope prepare-data --spec {params.spec:q} --out {output} > {log} 2>&1"
