# The adaptive study (study: adaptive): after the quick estimate, a checkpoint per workload picks the batch sizes
# to train, a bracket of the grid around the quick b_opt (batchscope.stages.adaptive). Its file holds the choice;
# the input functions of the fit, the Hessian stage and the cost tables read it (trained_batch_sizes in
# common.smk), so only the chosen sizes' train_model jobs are scheduled.
checkpoint choose_batch_sizes:
    input:
        quick=rules.quick_estimate.output[0],
    output:
        "results/adaptive/{workload}.nc",
    log:
        "logs/choose_batch_sizes/{workload}.log",
    benchmark:
        "results/benchmarks/choose_batch_sizes/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("choose_batch_sizes"),
        version=STAGES["choose_batch_sizes"].version,
        expect=expected_provenance("quick_estimate"),
    shell:
        "python -m batchscope choose-batch-sizes --spec {params.spec:q} --workload {wildcards.workload}"
        " --expect {params.expect:q} --quick {input.quick} --out {output} > {log} 2>&1"
