//! The protobuf codec of the agent's socket: prost, with small initial buffers.
//!
//! tonic's default codec reserves 8 KiB per open stream for encoding. An agent holds one
//! FetchX509SVID stream per workload for as long as the workload lives, and a message (an SVID
//! chain, its key and the bundle) is about 2 KiB, so with a thousand workloads the default
//! costs ~6 MiB of buffers that are never filled. Buffers still grow when a message needs it.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The initial buffer size, and the size past which an encoder yields to flush.
const BUFFER_SIZE: usize = 512;
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with [`BUFFER_SIZE`] initial buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
