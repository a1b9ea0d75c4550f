/*
 * The subset of the Semtech sx1302_hal (libloragw) V2.1.0 HAL API that lora-edge uses.
 *
 * Declarations follow the V2.1.0 ABI as recorded in hal-sys/tests/libloragw-v2.1.0-layout.txt
 * (identical on x86_64, aarch64 and armhf). This header is lora-edge's own: it is what the
 * committed Rust bindings are generated from, and what the simulated concentrator implements.
 * A gateway build links the real libloragw, whose structs must have these exact layouts; the
 * layout tests in hal-sys enforce that.
 *
 * Deliberately absent: the GPS API (struct tref differs between 32- and 64-bit time_t), the
 * debug configuration and spectral scan.
 */
#ifndef LORA_EDGE_LORAGW_HAL_H
#define LORA_EDGE_LORAGW_HAL_H

#include <stdbool.h>
#include <stdint.h>

#define LGW_HAL_SUCCESS 0
#define LGW_HAL_ERROR (-1)
#define LGW_LBT_NOT_ALLOWED 1

#define LGW_RF_CHAIN_NB 2
#define LGW_IF_CHAIN_NB 10
#define LGW_MULTI_NB 8
#define TX_GAIN_LUT_SIZE_MAX 16
#define LGW_LBT_CHANNEL_NB_MAX 16

/* modulation */
#define MOD_UNDEFINED 0
#define MOD_CW 0x08
#define MOD_LORA 0x10
#define MOD_FSK 0x20

/* LoRa bandwidth */
#define BW_UNDEFINED 0
#define BW_500KHZ 0x06
#define BW_250KHZ 0x05
#define BW_125KHZ 0x04

/* LoRa spreading factor (datarate) */
#define DR_UNDEFINED 0
#define DR_LORA_SF5 5
#define DR_LORA_SF6 6
#define DR_LORA_SF7 7
#define DR_LORA_SF8 8
#define DR_LORA_SF9 9
#define DR_LORA_SF10 10
#define DR_LORA_SF11 11
#define DR_LORA_SF12 12

/* LoRa coding rate */
#define CR_UNDEFINED 0
#define CR_LORA_4_5 0x01
#define CR_LORA_4_6 0x02
#define CR_LORA_4_7 0x03
#define CR_LORA_4_8 0x04

/* RX packet status */
#define STAT_UNDEFINED 0x00
#define STAT_NO_CRC 0x01
#define STAT_CRC_BAD 0x11
#define STAT_CRC_OK 0x10

/* TX mode */
#define IMMEDIATE 0
#define TIMESTAMPED 1
#define ON_GPS 2

/* lgw_status */
#define TX_STATUS 1
#define RX_STATUS 2
#define TX_STATUS_UNKNOWN 0
#define TX_OFF 1
#define TX_FREE 2
#define TX_SCHEDULED 3
#define TX_EMITTING 4

typedef enum {
    LGW_COM_SPI,
    LGW_COM_USB,
    LGW_COM_UNKNOWN
} lgw_com_type_t;

typedef enum {
    LGW_RADIO_TYPE_NONE,
    LGW_RADIO_TYPE_SX1255,
    LGW_RADIO_TYPE_SX1257,
    LGW_RADIO_TYPE_SX1272,
    LGW_RADIO_TYPE_SX1276,
    LGW_RADIO_TYPE_SX1250
} lgw_radio_type_t;

typedef enum {
    LGW_FTIME_MODE_HIGH_CAPACITY,
    LGW_FTIME_MODE_ALL_SF
} lgw_ftime_mode_t;

typedef enum {
    LGW_LBT_SCAN_TIME_128_US = 128,
    LGW_LBT_SCAN_TIME_5000_US = 5000
} lgw_lbt_scan_time_t;

struct lgw_conf_board_s {
    bool lorawan_public;
    uint8_t clksrc;
    bool full_duplex;
    lgw_com_type_t com_type;
    char com_path[64];
};

struct lgw_rssi_tcomp_s {
    float coeff_a;
    float coeff_b;
    float coeff_c;
    float coeff_d;
    float coeff_e;
};

struct lgw_conf_rxrf_s {
    bool enable;
    uint32_t freq_hz;
    float rssi_offset;
    struct lgw_rssi_tcomp_s rssi_tcomp;
    lgw_radio_type_t type;
    bool tx_enable;
    bool single_input_mode;
};

struct lgw_conf_rxif_s {
    bool enable;
    uint8_t rf_chain;
    int32_t freq_hz;
    uint8_t bandwidth;
    uint32_t datarate;
    uint8_t sync_word_size;
    uint64_t sync_word;
    bool implicit_hdr;
    uint8_t implicit_payload_length;
    bool implicit_crc_en;
    uint8_t implicit_coderate;
};

struct lgw_conf_demod_s {
    uint8_t multisf_datarate;
};

struct lgw_conf_ftime_s {
    bool enable;
    lgw_ftime_mode_t mode;
};

struct lgw_conf_chan_lbt_s {
    uint32_t freq_hz;
    uint8_t bandwidth;
    lgw_lbt_scan_time_t scan_time_us;
    uint16_t transmit_time_ms;
};

struct lgw_conf_lbt_s {
    bool enable;
    int8_t rssi_target;
    uint8_t nb_channel;
    struct lgw_conf_chan_lbt_s channels[LGW_LBT_CHANNEL_NB_MAX];
};

struct lgw_conf_sx1261_s {
    bool enable;
    char spi_path[64];
    int8_t rssi_offset;
    struct lgw_conf_lbt_s lbt_conf;
};

struct lgw_pkt_rx_s {
    uint32_t freq_hz;
    int32_t freq_offset;
    uint8_t if_chain;
    uint8_t status;
    uint32_t count_us;
    uint8_t rf_chain;
    uint8_t modem_id;
    uint8_t modulation;
    uint8_t bandwidth;
    uint32_t datarate;
    uint8_t coderate;
    float rssic;
    float rssis;
    float snr;
    float snr_min;
    float snr_max;
    uint16_t crc;
    uint16_t size;
    uint8_t payload[256];
    bool ftime_received;
    uint32_t ftime;
};

struct lgw_pkt_tx_s {
    uint32_t freq_hz;
    uint8_t tx_mode;
    uint32_t count_us;
    uint8_t rf_chain;
    int8_t rf_power;
    uint8_t modulation;
    int8_t freq_offset;
    uint8_t bandwidth;
    uint32_t datarate;
    uint8_t coderate;
    bool invert_pol;
    uint8_t f_dev;
    uint16_t preamble;
    bool no_crc;
    bool no_header;
    uint16_t size;
    uint8_t payload[256];
};

struct lgw_tx_gain_s {
    int8_t rf_power;
    uint8_t dig_gain;
    uint8_t pa_gain;
    uint8_t dac_gain;
    uint8_t mix_gain;
    int8_t offset_i;
    int8_t offset_q;
    uint8_t pwr_idx;
};

struct lgw_tx_gain_lut_s {
    struct lgw_tx_gain_s lut[TX_GAIN_LUT_SIZE_MAX];
    uint8_t size;
};

int lgw_board_setconf(struct lgw_conf_board_s *conf);
int lgw_rxrf_setconf(uint8_t rf_chain, struct lgw_conf_rxrf_s *conf);
int lgw_rxif_setconf(uint8_t if_chain, struct lgw_conf_rxif_s *conf);
int lgw_demod_setconf(struct lgw_conf_demod_s *conf);
int lgw_txgain_setconf(uint8_t rf_chain, struct lgw_tx_gain_lut_s *conf);
int lgw_ftime_setconf(struct lgw_conf_ftime_s *conf);
int lgw_sx1261_setconf(struct lgw_conf_sx1261_s *conf);
int lgw_start(void);
int lgw_stop(void);
int lgw_receive(uint8_t max_pkt, struct lgw_pkt_rx_s *pkt_data);
int lgw_send(struct lgw_pkt_tx_s *pkt_data);
int lgw_status(uint8_t rf_chain, uint8_t select, uint8_t *code);
int lgw_abort_tx(uint8_t rf_chain);
int lgw_get_trigcnt(uint32_t *trig_cnt_us);
int lgw_get_instcnt(uint32_t *inst_cnt_us);
int lgw_get_eui(uint64_t *eui);
int lgw_get_temperature(float *temperature);
const char *lgw_version_info(void);
uint32_t lgw_time_on_air(const struct lgw_pkt_tx_s *packet);

#endif
