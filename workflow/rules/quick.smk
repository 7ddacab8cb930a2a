# The quick estimate: b_opt from the profile and the reference run's gradient noise (B_noise), with what it cost.
# `snakemake quick` runs only what it needs: prepare_data, profile_hardware, train_reference and
# measure_gradient_noise per workload.
rule quick_estimate:
    input:
        profiles=profile_files,
        noise=rules.measure_gradient_noise.output[0],
    output:
        "results/quick/{workload}.nc",
    log:
        "logs/quick_estimate/{workload}.log",
    benchmark:
        "results/benchmarks/quick_estimate/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("quick_estimate"),
        version=STAGES["quick_estimate"].version,
        benchmarks=lambda w: benchmark_pairs(quick_benchmarks(w)),
    shell:
        "python -m batchscope quick-estimate --spec {params.spec:q} --workload {wildcards.workload}"
        " --profiles {input.profiles} --noise {input.noise} --benchmarks {params.benchmarks}"
        " --out {output} > {log} 2>&1"


rule quick:
    default_target: False
    input:
        expand(rules.quick_estimate.output[0], workload=WORKLOADS),
    localrule: True
