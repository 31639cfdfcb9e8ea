//! Bounded fuzzing of request decoding (runs in CI with a fixed case count): arbitrary bytes,
//! arbitrary JSON and mutated valid requests, over REST and gRPC, must decode or fail with a
//! 4xx error; never panic, never claim a huge allocation.

use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};
use slimnn_serve::codec::{bind_inputs, decode_rest};
use slimnn_serve::grpc::decode_grpc;
use slimnn_serve::model::{SigDim, Signature, TensorSpec};
use slimnn_serve::proto::ModelInferRequest;
use slimnn_serve::ServeError;
use slimnn_tensor::DType;

fn bert_signature() -> Signature {
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        dtype: DType::I64,
        shape: vec![SigDim::Free(Some("batch".into())), SigDim::Free(Some("sequence".into()))],
    };
    Signature {
        inputs: vec![spec("input_ids"), spec("attention_mask"), spec("token_type_ids")],
        outputs: vec![TensorSpec {
            name: "sentence_embedding".into(),
            dtype: DType::F32,
            shape: vec![SigDim::Free(Some("batch".into())), SigDim::Fixed(384)],
        }],
    }
}

fn is_client_error(e: &ServeError) -> bool {
    e.status().is_client_error()
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[a-zA-Z_]{0,12}".prop_map(Value::String),
        prop_oneof![Just("INT64"), Just("FP32"), Just("FP16"), Just("BOOL"), Just("BYTES")].prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("inputs".to_string()),
                    Just("name".to_string()),
                    Just("datatype".to_string()),
                    Just("shape".to_string()),
                    Just("data".to_string()),
                    Just("parameters".to_string()),
                    Just("binary_data_size".to_string()),
                    Just("outputs".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid request to mutate: three `[1, n]` INT64 inputs.
fn valid_request(n: usize) -> Value {
    let input = |name: &str| json!({"name": name, "datatype": "INT64", "shape": [1, n], "data": vec![1; n]});
    json!({"inputs": [input("input_ids"), input("attention_mask"), input("token_type_ids")]})
}

fn check_rest(body: &[u8], header_len: Option<usize>, sig: &Signature) {
    match decode_rest(body, header_len) {
        Ok(req) => {
            if let Err(e) = bind_inputs(sig, req.inputs) {
                assert!(is_client_error(&e), "bind gave a non-4xx error: {e:?}");
            }
        }
        Err(e) => assert!(is_client_error(&e), "decode gave a non-4xx error: {e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rest_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512), split in any::<Option<u16>>()) {
        check_rest(&body, split.map(|s| s as usize), &bert_signature());
    }

    #[test]
    fn rest_arbitrary_json(v in json_value()) {
        check_rest(v.to_string().as_bytes(), None, &bert_signature());
    }

    #[test]
    fn rest_mutated_valid_request(
        n in 1usize..6,
        which in 0usize..3,
        field in prop_oneof![Just("name"), Just("datatype"), Just("shape"), Just("data"), Just("parameters")],
        replacement in json_value(),
        binary_tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut v = valid_request(n);
        v["inputs"][which][field] = replacement;
        let mut body = v.to_string().into_bytes();
        let header_len = (!binary_tail.is_empty()).then_some(body.len());
        body.extend_from_slice(&binary_tail);
        check_rest(&body, header_len, &bert_signature());
    }

    #[test]
    fn grpc_arbitrary_protobuf(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = ModelInferRequest::decode(bytes.as_slice()) {
            match decode_grpc(&req) {
                Ok(inputs) => {
                    if let Err(e) = bind_inputs(&bert_signature(), inputs) {
                        prop_assert!(is_client_error(&e), "{e:?}");
                    }
                }
                Err(e) => prop_assert!(is_client_error(&e), "{e:?}"),
            }
        }
    }
}
