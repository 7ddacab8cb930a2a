rule fit_scaling:
    input:
        profiles=profile_files,
        runs=train_dirs,
        choice=choice_file,
    output:
        "results/fit/{workload}.nc",
    log:
        "logs/fit_scaling/{workload}.log",
    benchmark:
        "results/benchmarks/fit_scaling/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("fit_scaling"),
        version=STAGES["fit_scaling"].version,
        expect=expected_provenance("profile_hardware", "train_model"),
        benchmarks=lambda w: benchmark_pairs(answer_benchmarks(w)),
        choice=lambda w, input: f"--choice {input.choice}" if input.choice else "",
    shell:
        "python -m batchscope fit --spec {params.spec:q} --workload {wildcards.workload} --expect {params.expect:q}"
        " --profiles {input.profiles} --runs {input.runs} --benchmarks {params.benchmarks} {params.choice}"
        " --out {output} > {log} 2>&1"
