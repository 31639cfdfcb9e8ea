//! gRPC: `inference.GRPCInferenceService` (KServe v2) through tonic.

use crate::codec::{self, datatype_name, parse_datatype, WireTensor};
use crate::error::ServeError;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::model_infer_request::InferInputTensor;
use crate::proto::model_infer_response::InferOutputTensor;
use crate::proto::model_metadata_response::TensorMetadata;
use crate::proto::*;
use crate::server::AppState;
use slimnn_tensor::{DType, Tensor};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct GrpcService {
    pub state: Arc<AppState>,
}

fn bad(m: impl Into<String>) -> ServeError {
    ServeError::BadRequest(m.into())
}

/// One input tensor from its typed `contents` (when no raw bytes are sent).
fn tensor_from_contents(t: &InferInputTensor, dtype: DType, shape: Vec<usize>) -> Result<Tensor, ServeError> {
    let what = format!("input '{}'", t.name);
    let c = t.contents.as_ref().ok_or_else(|| bad(format!("{what}: no contents and no raw_input_contents")))?;
    let n = codec::element_count(&shape, &what)?;
    let check_len = |len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(bad(format!("{what}: {len} values given but shape {shape:?} needs {n}")))
        }
    };
    let ints = |v: &[i32], lo: i64, hi: i64| -> Result<Vec<i64>, ServeError> {
        check_len(v.len())?;
        v.iter()
            .map(|&x| {
                let x = x as i64;
                if (lo..=hi).contains(&x) {
                    Ok(x)
                } else {
                    Err(bad(format!("{what}: value {x} is out of range for {}", datatype_name(dtype).unwrap_or("?"))))
                }
            })
            .collect()
    };
    let r = match dtype {
        DType::F32 => {
            check_len(c.fp32_contents.len())?;
            Tensor::from_vec(shape.clone(), c.fp32_contents.clone())
        }
        DType::F64 => {
            check_len(c.fp64_contents.len())?;
            Tensor::from_vec(shape.clone(), c.fp64_contents.clone())
        }
        DType::I64 => {
            check_len(c.int64_contents.len())?;
            Tensor::from_vec(shape.clone(), c.int64_contents.clone())
        }
        DType::I32 => {
            Tensor::from_i64s(dtype, shape.clone(), &ints(&c.int_contents, i32::MIN as i64, i32::MAX as i64)?)
        }
        DType::I16 => {
            Tensor::from_i64s(dtype, shape.clone(), &ints(&c.int_contents, i16::MIN as i64, i16::MAX as i64)?)
        }
        DType::I8 => Tensor::from_i64s(dtype, shape.clone(), &ints(&c.int_contents, i8::MIN as i64, i8::MAX as i64)?),
        DType::U8 => {
            check_len(c.uint_contents.len())?;
            let v: Result<Vec<u8>, _> = c
                .uint_contents
                .iter()
                .map(|&x| u8::try_from(x).map_err(|_| bad(format!("{what}: value {x} is out of range for UINT8"))))
                .collect();
            Tensor::from_vec(shape.clone(), v?)
        }
        DType::Bool => {
            check_len(c.bool_contents.len())?;
            Tensor::from_vec(shape.clone(), c.bool_contents.clone())
        }
        other => {
            return Err(bad(format!(
                "{what}: {} data must be sent as raw_input_contents",
                datatype_name(other).unwrap_or("?")
            )))
        }
    };
    r.map_err(|e| bad(format!("{what}: {e}")))
}

/// Decodes a gRPC inference request's inputs (raw or typed contents).
pub fn decode_grpc(req: &ModelInferRequest) -> Result<Vec<WireTensor>, ServeError> {
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut out = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.iter().enumerate() {
        let what = format!("input '{}'", t.name);
        let dtype = parse_datatype(&t.datatype).map_err(|e| bad(format!("{what}: {e}")))?;
        let shape: Vec<usize> = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad(format!("{what}: shape entry {d} is negative"))))
            .collect::<Result<_, _>>()?;
        let tensor = match req.raw_input_contents.get(i) {
            Some(raw) => {
                if t.contents.is_some() {
                    return Err(bad(format!("{what}: both contents and raw_input_contents given")));
                }
                codec::tensor_from_raw(dtype, shape, raw, &what)?
            }
            None => tensor_from_contents(t, dtype, shape)?,
        };
        out.push(WireTensor { name: t.name.clone(), tensor });
    }
    Ok(out)
}

impl GrpcService {
    async fn infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, ServeError> {
        let model = self.state.repo.resolve(&req.model_name, Some(&req.model_version))?;
        let wanted: Vec<usize> = if req.outputs.is_empty() {
            (0..model.signature.outputs.len()).collect()
        } else {
            req.outputs
                .iter()
                .map(|o| {
                    model
                        .signature
                        .outputs
                        .iter()
                        .position(|s| s.name == o.name)
                        .ok_or_else(|| bad(format!("output '{}': the model has no such output", o.name)))
                })
                .collect::<Result<_, _>>()?
        };
        let inputs = codec::bind_inputs(&model.signature, decode_grpc(&req)?)?;
        let outputs = self.state.infer(&model, inputs).await?;
        let mut resp = ModelInferResponse {
            model_name: model.source.name.clone(),
            model_version: model.source.version.clone(),
            id: req.id,
            ..Default::default()
        };
        for i in wanted {
            let t = &outputs[i];
            resp.outputs.push(InferOutputTensor {
                name: model.signature.outputs[i].name.clone(),
                datatype: datatype_name(t.dtype()).unwrap_or("?").to_string(),
                shape: t.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
            resp.raw_output_contents.push(t.to_le_bytes());
        }
        Ok(resp)
    }

    fn record<T>(&self, model: &str, started: Instant, r: &Result<T, ServeError>) {
        let code = match r {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        };
        let label = if self.state.repo.versions(model).is_empty() { "" } else { model };
        self.state.metrics.request(label, "grpc", code, started.elapsed());
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.ready() }))
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        match self.state.repo.resolve(&r.name, Some(&r.version)) {
            Ok(_) => Ok(Response::new(ModelReadyResponse { ready: true })),
            Err(ServeError::NotFound(m)) => Err(ServeError::NotFound(m).into()),
            Err(_) => Ok(Response::new(ModelReadyResponse { ready: false })),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "slimnn".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: crate::server::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = self.state.repo.resolve(&r.name, Some(&r.version))?;
        let meta = |specs: &[crate::model::TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata {
                    name: s.name.clone(),
                    datatype: datatype_name(s.dtype).unwrap_or("?").into(),
                    shape: s.wire_shape(),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.source.name.clone(),
            versions: self.state.repo.versions(&m.source.name),
            platform: "slimnn".into(),
            inputs: meta(&m.signature.inputs),
            outputs: meta(&m.signature.outputs),
        }))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let model = req.model_name.clone();
        let r = self.infer(req).await;
        self.record(&model, started, &r);
        r.map(Response::new).map_err(Status::from)
    }
}
